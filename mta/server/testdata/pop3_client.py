"""Drives the POP3 edge with Python's poplib, an independent client, and
prints one JSON line per step for the Go test to check."""
import json
import poplib
import socket
import ssl
import sys
import time

host, port, user, password, want_file = sys.argv[1:6]
want = open(want_file, "rb").read()


def out(step, **kw):
    print(json.dumps(dict(step=step, **kw)), flush=True)


def err_text(e):
    return e.args[0].decode() if isinstance(e.args[0], bytes) else str(e)


def connect():
    return poplib.POP3(host, int(port), timeout=10)


# CAPA before and after STLS, then a login over TLS.
p = connect()
out("greeting", text=p.getwelcome().decode())
out("capa", caps=sorted(p.capa().keys()))
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
p.stls(ctx)
out("capa-tls", caps=sorted(p.capa().keys()))
p.user(user)
p.pass_(password)
count, size = p.stat()
out("stat", count=count, size=size)
out("list", lines=[l.decode() for l in p.list()[1]])
out("uidl", lines=[l.decode() for l in p.uidl()[1]])
resp, lines, octets = p.retr(1)
got = b"\r\n".join(lines) + b"\r\n"
out("retr", resp=resp.decode(), octets=octets, same=got == want, size=len(got))
resp, lines, octets = p.top(1, 0)
out("top", lines=len(lines), last=lines[-1].decode() if lines else None)

# A second session on the same mailbox is refused while this one holds it.
q = connect()
q.user(user)
try:
    q.pass_(password)
    out("second", text="+OK")
except poplib.error_proto as e:
    out("second", text=err_text(e))
q.quit()

# Marked for deletion, but the connection drops without QUIT: kept.
p.dele(1)
p.sock.close()
time.sleep(0.3)

p = connect()
p.user(user)
p.pass_(password)
out("after-drop", count=p.stat()[0])
p.dele(1)
try:
    p.retr(1)
    out("retr-deleted", text="+OK")
except poplib.error_proto as e:
    out("retr-deleted", text=err_text(e))
p.rset()
out("after-rset", count=p.stat()[0])
for i in range(1, p.stat()[0] + 1):
    p.dele(i)
out("quit", text=p.quit().decode())

# SASL PLAIN (RFC 5034) sees the empty mailbox.
p = connect()
import base64
resp = p._shortcmd("AUTH PLAIN " + base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode())
out("auth-plain", text=resp.decode(), count=p.stat()[0])
p.quit()

# A wrong password is refused, after a delay.
p = connect()
p.user(user)
start = time.time()
try:
    p.pass_("wrong")
    out("wrong", text="+OK")
except poplib.error_proto as e:
    out("wrong", text=err_text(e), delay=time.time() - start)
p.quit()
