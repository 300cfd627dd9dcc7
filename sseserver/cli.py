"""The command line: argv -> Config -> Daemon, and the exit code.

Owns: flags, their help text, and the rule that every usage or config problem is one line on stderr and exit
code 2 (run-time failures are 1, a clean stop 0). Must not know: HTTP.
"""

import argparse
import os
import sys

from . import __version__, handover, logs, resp
from . import config as config_module
from .access import Policy
from .daemon import Daemon


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints a usage block and the error; one line is easier to read in a journal.
        sys.stderr.write(f"sseserver: {message} (see --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sseserver",
        description="A Server-Sent Events notification daemon: POST /publish, GET /subscribe.",
        epilog="sseserver doctor URL [--help]: check what breaks streaming between a deployment and browsers.",
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="TOML config file (see sseserver.toml)")
    parser.add_argument("--host", help="address to listen on (overrides the config file)")
    parser.add_argument("--port", type=_port, help="port to listen on, 0 for any free port")
    parser.add_argument("--log-level", choices=config_module.LOG_LEVELS, help="log verbosity")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"sseserver {__version__}")
    return parser


def _port(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None


def overrides(args: argparse.Namespace) -> dict:
    """The config keys given on the command line. They win over the file at start and on every reload."""
    return {
        name: value
        for name, value in (("host", args.host), ("port", args.port), ("log_level", args.log_level))
        if value is not None
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        from . import doctor  # a client of a deployment, with its own flags; loaded only when asked for

        return doctor.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        flags = overrides(args)
        config = config_module.load_layered(args.config, flags)
        Policy(config)  # reads the token files, so a bad one is a config error now, not at start
        if config.redis_url:
            resp.parse_url(config.redis_url)
    except config_module.ConfigError as exc:
        sys.stderr.write(f"sseserver: bad config: {exc}\n")
        handover.report_failure(os.environ, f"bad config: {exc}")  # started for an upgrade: say why not
        return 2
    if args.check_config:
        print(f"sseserver: config OK ({args.config or 'built-in defaults'})")
        return 0
    logs.configure(config.log_level)
    try:
        return Daemon(config, args.config, overrides=flags, argv=argv).run()
    except KeyboardInterrupt:
        return 1  # a Ctrl-C before the handlers were installed
