"""request.py: head parsing (pure, table-driven) and RequestReader over a real socketpair, fed whole, byte by
byte, and with trailing bytes of the next request."""

import socket
import threading
import unittest

from sseserver.errors import HTTPError
from sseserver.request import RequestReader, body_length, parse_head

GOOD_HEADS = [
    (b"GET /subscribe HTTP/1.1\r\nHost: x\r", ("GET", "/subscribe", [], {"host": "x"}, True)),
    (
        b"POST /publish?event=a%2Eb HTTP/1.0\r\nContent-Length: 3\r",
        ("POST", "/publish", [("event", "a.b")], {"content-length": "3"}, False),
    ),
    (b"GET /health HTTP/1.0\nConnection: keep-alive", ("GET", "/health", [], {"connection": "keep-alive"}, True)),
    (b"GET /x HTTP/1.1\r\nConnection: close\r", ("GET", "/x", [], {"connection": "close"}, False)),
    (b"GET /x HTTP/1.1\r\nA: 1\r\na: 2\r\nB:   spaced  \r", ("GET", "/x", [], {"a": "1, 2", "b": "spaced"}, True)),
    (b"GET /p%20q?x=&y=1&x=2 HTTP/1.1", ("GET", "/p q", [("x", ""), ("y", "1"), ("x", "2")], {}, True)),
]

BAD_HEADS = [
    (b"GET /x", 400),
    (b"GET  /x HTTP/1.1", 400),
    (b"get /x HTTP/1.1", 400),
    (b"GET x HTTP/1.1", 400),
    (b"GET /x HTTP/2.0", 505),
    (b"GET /x FTP/1.0", 400),
    (b"GET /\xff HTTP/1.1", 400),
    (b"GET /x HTTP/1.1\r\n folded: yes", 400),
    (b"GET /x HTTP/1.1\r\nno colon", 400),
    (b"GET /x HTTP/1.1\r\nBad Name: x", 400),
    (b"GET /x HTTP/1.1\r\nX: a\x00b", 400),
    (b"GET /x HTTP/1.1\r\nX: a\rb", 400),
    (b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2", 400),
    (b"GET /" + b"a" * 300 + b" HTTP/1.1", 414),
]


class ParseHeadTest(unittest.TestCase):
    def test_good_heads_parse_into_method_path_query_headers_and_keep_alive(self):
        for head, (method, path, query, headers, keep_alive) in GOOD_HEADS:
            with self.subTest(head=head):
                request = parse_head(head, 256)
                self.assertEqual(
                    (request.method, request.path, request.query, request.headers, request.keep_alive),
                    (method, path, query, headers, keep_alive),
                )

    def test_each_bad_head_is_an_http_error_with_its_status(self):
        for head, status in BAD_HEADS:
            with self.subTest(head=head[:40]):
                with self.assertRaises(HTTPError) as caught:
                    parse_head(head, 256)
                self.assertEqual(caught.exception.status, status)

    def test_body_length_comes_from_content_length_or_chunked_and_each_bad_framing_has_its_status(self):
        def request(**headers):
            return parse_head(
                b"POST /publish HTTP/1.1\r\n"
                + b"".join(f"{k.replace('_', '-')}: {v}\r\n".encode() for k, v in headers.items()),
                1024,
            )

        self.assertEqual(body_length(request(content_length="5"), 10), 5)
        self.assertIsNone(body_length(request(transfer_encoding="chunked"), 10))
        for headers, status in [
            ({}, 411),
            ({"content_length": "11"}, 413),
            ({"content_length": "-1"}, 400),
            ({"content_length": "1e3"}, 400),
            ({"content_length": "99999999999999999999"}, 400),
            ({"transfer_encoding": "gzip"}, 501),
            ({"transfer_encoding": "chunked", "content_length": "3"}, 400),
        ]:
            with self.subTest(headers=headers), self.assertRaises(HTTPError) as caught:
                body_length(request(**headers), 10)
            self.assertEqual(caught.exception.status, status)


class ReaderTest(unittest.TestCase):
    def setUp(self):
        self.server_side, self.client_side = socket.socketpair()
        self.reader = RequestReader(self.server_side)

    def tearDown(self):
        self.server_side.close()
        self.client_side.close()

    def send(self, data: bytes, byte_by_byte: bool = False):
        def run():
            if byte_by_byte:
                for index in range(len(data)):
                    self.client_side.sendall(data[index : index + 1])
            else:
                self.client_side.sendall(data)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def test_pipelined_requests_whole_and_byte_by_byte(self):
        raw = (
            b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n"
            b"Trailer: x\r\n\r\nGET /health HTTP/1.1\n\n"
        )
        for byte_by_byte in (False, True):
            with self.subTest(byte_by_byte=byte_by_byte):
                thread = self.send(raw, byte_by_byte)
                request = parse_head(self.reader.read_head(5, 5, 1024), 1024)
                self.assertEqual(self.reader.read_body(body_length(request, 100), 100), b"hello")
                request = parse_head(self.reader.read_head(5, 5, 1024), 1024)
                self.assertEqual(self.reader.read_body(body_length(request, 100), 100), b"abcde")
                self.assertEqual(parse_head(self.reader.read_head(5, 5, 1024), 1024).path, "/health")
                thread.join()

    def test_bad_chunked_bodies(self):
        cases = [
            b"zz\r\n",
            b"0x3\r\nabc\r\n0\r\n\r\n",
            b"+3\r\nabc\r\n0\r\n\r\n",
            b"3\r\nabcXX\r\n0\r\n\r\n",
            b"-1\r\n",
            b"fffffffffffffffff\r\n",
        ]
        for body in cases:
            with self.subTest(body=body):
                self.setUp()
                self.send(b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body).join()
                request = parse_head(self.reader.read_head(5, 5, 1024), 1024)
                with self.assertRaises(HTTPError) as caught:
                    self.reader.read_body(body_length(request, 100), 100)
                self.assertEqual(caught.exception.status, 400)
                self.tearDown()

    def test_chunked_body_over_the_limit(self):
        self.send(b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n").join()
        request = parse_head(self.reader.read_head(5, 5, 1024), 1024)
        with self.assertRaises(HTTPError) as caught:
            self.reader.read_body(body_length(request, 10), 10)
        self.assertEqual(caught.exception.status, 413)

    def test_oversized_heads(self):
        for raw, status in [(b"GET /" + b"a" * 2000, 414), (b"GET / HTTP/1.1\r\nX: " + b"a" * 2000, 431)]:
            with self.subTest(status=status):
                self.setUp()
                self.send(raw).join()
                with self.assertRaises(HTTPError) as caught:
                    self.reader.read_head(5, 5, 1024)
                self.assertEqual(caught.exception.status, status)
                self.tearDown()

    def test_a_slow_head_times_out_with_408(self):
        self.send(b"GET / HTTP/1.1\r\n").join()  # and then nothing more
        with self.assertRaises(HTTPError) as caught:
            self.reader.read_head(5, 0.2, 1024)
        self.assertEqual(caught.exception.status, 408)

    def test_idle_or_closed_connection_gives_none(self):
        self.assertIsNone(self.reader.read_head(0.1, 5, 1024))
        self.client_side.close()
        self.assertIsNone(self.reader.read_head(5, 5, 1024))


if __name__ == "__main__":
    unittest.main()
