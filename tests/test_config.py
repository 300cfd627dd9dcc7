"""config.py: the key table, validation, and the shipped sseserver.toml."""

import dataclasses
import os
import tempfile
import tomllib
import typing
import unittest

from sseserver import config
from tests.support import ROOT, write_config

BAD_VALUES = [
    ("port", 70000, "between"),
    ("port", -1, "between"),
    ("port", "5000", "whole number"),
    ("port", True, "whole number"),
    ("queue_size", 0, "between"),
    ("queue_size", 1.5, "whole number"),
    ("history_size", -5, "between"),
    ("heartbeat_interval", True, "number of seconds"),
    ("heartbeat_interval", "15", "number of seconds"),
    ("heartbeat_interval", 0, "between"),
    ("heartbeat_interval", float("nan"), "number of seconds"),
    ("max_message_bytes", 0, "between"),
    ("log_level", "loud", "one of"),
    ("log_level", 3, "string"),
    ("host", 127, "string"),
    ("writer_threads", 0, "between"),
]


class ConfigTest(unittest.TestCase):
    def test_an_empty_mapping_gives_the_defaults(self):
        cfg = config.from_mapping({})
        self.assertEqual((cfg.host, cfg.port, cfg.queue_size, cfg.history_size), ("127.0.0.1", 5000, 16, 1000))
        self.assertEqual((cfg.heartbeat_interval, cfg.max_message_bytes, cfg.shutdown_timeout), (15.0, 65536, 5.0))

    def test_bad_values_name_the_key(self):
        for key, value, phrase in BAD_VALUES:
            with self.subTest(key=key, value=value):
                with self.assertRaises(config.ConfigError) as caught:
                    config.from_mapping({key: value})
                self.assertIn(repr(key), str(caught.exception))
                self.assertIn(phrase, str(caught.exception))
                self.assertNotIn("\n", str(caught.exception))

    def test_unknown_key_refused(self):
        with self.assertRaisesRegex(config.ConfigError, "'queue_sise': unknown key"):
            config.from_mapping({"queue_sise": 3})

    def test_ints_are_accepted_as_seconds(self):
        self.assertEqual(config.from_mapping({"heartbeat_interval": 2}).heartbeat_interval, 2.0)

    def test_config_is_frozen(self):
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.from_mapping({}).port = 1

    def test_the_config_class_declares_every_key_of_the_table_in_order_with_its_kind(self):
        fields = dataclasses.fields(config.Config)
        declared = [(field.name, typing.get_origin(field.type) or field.type) for field in fields]
        self.assertEqual(declared, [(key.name, key.kind) for key in config.KEYS])

    def test_secret_keys_never_show_in_the_repr(self):
        secret = config.from_mapping({"metrics_token": "s3cret-metrics", "publish_tokens": ["s3cret-publish"]})
        self.assertNotIn("s3cret", repr(secret))
        self.assertIn("port=5000", repr(secret))

    def test_a_file_that_is_not_toml_or_cannot_be_read_is_a_config_error(self):
        with tempfile.TemporaryDirectory() as tmp:
            broken = os.path.join(tmp, "broken.toml")
            with open(broken, "w") as handle:  # by hand: write_config only writes valid TOML
                handle.write("port = \n")
            with self.assertRaisesRegex(config.ConfigError, "not valid TOML"):
                config.load(broken)
            with self.assertRaisesRegex(config.ConfigError, "cannot read"):
                config.load(os.path.join(tmp, "missing.toml"))

    def test_shipped_file_is_every_key_at_its_default(self):
        path = os.path.join(ROOT, "sseserver.toml")
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        self.assertEqual(text, config.render_default_toml(), "regenerate with config.render_default_toml()")
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
        defaults = {key.name: key.default for key in config.KEYS}
        self.assertEqual({k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}, defaults)
        self.assertEqual(config.load(path), config.from_mapping({}))
        for key in config.KEYS:  # each key has its one-line comment right above it
            self.assertIn(f"# {key.doc}", text)

    def test_any_origin_with_credentials_is_refused_naming_both_keys(self):
        with self.assertRaises(config.ConfigError) as caught:
            config.from_mapping({"cors_origins": ["https://a.example", "*"], "cors_credentials": True})
        self.assertIn("'cors_credentials'", str(caught.exception))
        self.assertIn("cors_origins", str(caught.exception))
        config.from_mapping({"cors_origins": ["*"]})
        config.from_mapping({"cors_origins": ["https://a.example"], "cors_credentials": True})

    def test_command_line_overrides_layer_over_the_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_config(tmp, "c.toml", log_level="error", port=1, queue_size=7)
            layered = config.load_layered(path, {"log_level": "debug", "port": 0})
            self.assertEqual((layered.log_level, layered.port, layered.queue_size), ("debug", 0, 7))
            self.assertEqual(config.load_layered(None, {}), config.from_mapping({}))

    def test_only_keys_that_need_a_restart_are_reported_as_changed(self):
        old = config.from_mapping({})
        new = config.from_mapping({"port": 6000, "queue_size": 5})
        self.assertEqual(config.restart_keys_changed(old, new), ["port"])


if __name__ == "__main__":
    unittest.main()
