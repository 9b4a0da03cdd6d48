"""The nginx text walk, server selection and the journal's undo of batch-nginx's include:
in-process, on configuration files written here (no nginx, no certbot subprocess)."""
from __future__ import annotations

import os
from pathlib import Path

from certbot_batch.challenges import journal
from certbot_batch.servers import nginx


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_walk_follows_includes_and_nginx_syntax(tmp_path: Path) -> None:
    root = tmp_path / "etc-nginx"
    write(root / "nginx.conf",
          "user www-data; pid /run/x.pid; error_log /var/log/x.log warn;\n"
          "events { }\nhttp {\n  ssl_certificate /inherited/cert.pem;\n"
          "  include conf.d/*.conf;   # relative to nginx.conf's directory\n"
          "  include /nonexistent/*.conf;\n"
          "  server { include snippets/listen.inc; server_name 'quoted.test' "
          "\"dq.test\"; ssl_certificate_key /k/q.key; }\n}\n"
          "stream { server { listen 5000 ssl; ssl_certificate /stream/c.pem; } }\n")
    write(root / "snippets" / "listen.inc", "listen [::]:8443 ssl default_server;\n")
    write(root / "conf.d" / "a.conf",
          "server {listen 127.0.0.1:8080;server_name a.test *.a.test;"
          "location / { return 301 https://$host; } if ($x) { set $y 1; } }\n"
          "server { server_name \"b.test\"; ssl on; listen 8443; "
          "ssl_certificate ../certs/b.pem; ssl_certificate_key $var.key; }\n"
          "# server { listen 9999; }\n")
    found = nginx.walk(str(root))
    assert found.pid == "/run/x.pid" and found.error_logs == ["/var/log/x.log"]
    # in nginx's order: the included file's blocks where the include is
    assert [b.names for b in found.servers] == [["a.test", "*.a.test"], ["b.test"],
                                                ["quoted.test", "dq.test"]]
    a, b, quoted = found.servers
    assert quoted.listens == [nginx.Listen("::", 8443, True, True)]
    assert a.listens == [nginx.Listen("127.0.0.1", 8080, False, False)]
    assert a.redirects  # the server-level if (a location's return does not count)
    assert b.listens == [nginx.Listen("*", 8443, True, False)]  # ssl on
    assert b.certs == [str(root / "../certs/b.pem")]
    assert "/stream/c.pem" in found.cert_paths  # every certificate, any context
    assert not any("$" in p for p in found.cert_paths)
    ends = nginx.endpoints_of(found)
    assert ends["/inherited/cert.pem"] == [nginx.Endpoint("::1", 8443, "quoted.test")]
    text = (root / "conf.d" / "a.conf").read_text()
    assert text[a.open_end - 1] == "{" and text[b.open_end - 1] == "{"
    assert found.unreadable == [] and str(root / "conf.d" / "a.conf") in found.files


def test_server_selection_follows_nginx_rules(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write(root / "nginx.conf", "http {\n"
          "server { listen 80; server_name first.test; }\n"
          "server { listen 80; server_name *.example.test; }\n"
          "server { listen 80; server_name www.example.*; }\n"
          "server { listen 80 default_server; server_name _; }\n"
          "server { listen 80; server_name ~^re\\d+\\.test$; }\n"
          "server { listen 80; server_name exact.example.test; return 301 https://x; }\n"
          "server { listen 443 ssl; server_name exact.example.test; }\n"
          "server { listen 443 ssl; server_name other.test; }\n"
          "}\n")
    found = nginx.walk(str(root))
    plain = [b for b in found.servers if not b.listens[0].ssl]
    pick = nginx.server_for_name
    assert pick(plain, "exact.example.test").names == ["exact.example.test"]
    assert pick(plain, "a.example.test").names == ["*.example.test"]
    assert pick(plain, "www.example.org").names == ["www.example.*"]
    assert pick(plain, "re42.test").names == ["~^re\\d+\\.test$"]
    assert pick(plain, "unknown.test").names == ["_"]  # default_server, not the first
    assert pick(plain, "unknown.test", default=False) is None
    blocks, unserved = nginx.plan(found, ["exact.example.test", "unknown.test"])
    # the redirecting block, its SSL block (for a CA that follows), the default server
    assert [b.names for b in blocks] == [["_"], ["exact.example.test"],
                                         ["exact.example.test"]]
    assert unserved == []
    write(root / "nginx.conf", "http { server { listen 443 ssl; server_name s.test; } }\n")
    assert nginx.plan(nginx.walk(str(root)), ["s.test"]) == ([], ["s.test"])


def test_undo_insert_removes_exactly_the_include(tmp_path: Path) -> None:
    conf = write(tmp_path / "site.conf", "server {listen 80;}\nserver\n{\n}\n")
    original = conf.read_bytes()
    os.utime(conf, ns=(1_000_000_000, 2_000_000_000))
    st = conf.stat()
    text = nginx.include_text(str(tmp_path / nginx.SNIPPET_NAME))
    edited = "server {" + text + "listen 80;}\nserver\n{" + text + "\n}\n"
    journal.write_preserving(str(conf), edited, st)
    conf.write_text(conf.read_text() + "# the admin's edit meanwhile\n")
    assert journal.undo_insert({"path": str(conf), "text": text,
                                "mtime_ns": st.st_mtime_ns, "atime_ns": st.st_atime_ns})
    assert conf.read_bytes() == original + b"# the admin's edit meanwhile\n"
    assert not journal.undo_insert({"path": str(conf), "text": text})  # nothing left
    assert not Path(journal.temp_path_for(str(conf))).exists()


def test_undo_insert_refuses_anything_but_the_include(tmp_path: Path) -> None:
    victim = write(tmp_path / "victim.conf", "keep me; include \"/x/other.conf\";\n")
    for text in ("keep me;", ' include "/x/other.conf";', ' include "relative/'
                 f'{nginx.SNIPPET_NAME}";'):
        assert not journal.undo_insert({"path": str(victim), "text": text})
    assert victim.read_text() == "keep me; include \"/x/other.conf\";\n"
    snippet = str(tmp_path / "root" / nginx.SNIPPET_NAME)
    assert journal.safe_to_remove("file", snippet, str(tmp_path / "root")) is None
    assert journal.safe_to_remove("file", snippet, str(tmp_path)) is not None
    assert journal.safe_to_remove("file", snippet, None) is not None
