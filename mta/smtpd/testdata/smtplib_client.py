"""Drives the SMTP edge with Python's smtplib, a real outside client.

Usage: smtplib_client.py HOST PORT. Prints one JSON object per scenario:
{"scenario": ..., "code": ..., "reply": ...}; the Go test checks them.
"""
import json
import smtplib
import ssl
import sys

host, port = sys.argv[1], int(sys.argv[2])


def report(scenario, code, reply):
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    print(json.dumps({"scenario": scenario, "code": code, "reply": reply}), flush=True)


def message(subject):
    return ("From: app@example.org\r\nTo: user@remote.test\r\nSubject: %s\r\n\r\n"
            "Hello from smtplib.\r\n.line starting with a dot\r\n" % subject)


# 1. A plain send.
with smtplib.SMTP(host, port, local_hostname="py.test") as s:
    s.ehlo()
    code, reply = s.mail("app@example.org")
    s.rcpt("user@remote.test")
    code, reply = s.data(message("plain"))
    report("plain", code, reply)

# 2. STARTTLS, then AUTH PLAIN and AUTH LOGIN, then send.
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
for mech in ("PLAIN", "LOGIN"):
    with smtplib.SMTP(host, port, local_hostname="py.test") as s:
        s.starttls(context=ctx)
        s.ehlo()
        report("auth-offered-" + mech, 0, s.esmtp_features.get("auth", "").strip())
        try:
            s.login("alice", "wrong", initial_response_ok=(mech == "PLAIN"))
        except smtplib.SMTPAuthenticationError as e:
            report("auth-wrong-" + mech, e.smtp_code, e.smtp_error)
        s.user, s.password = "alice", "s3cret"
        code, reply = s.auth(mech, getattr(s, "auth_" + mech.lower()),
                             initial_response_ok=(mech == "PLAIN"))
        report("auth-" + mech, code, reply)
        s.mail("app@example.org")
        s.rcpt("user@remote.test")
        code, reply = s.data(message("tls " + mech))
        report("tls-send-" + mech, code, reply)

# 3. Limits: SIZE over the limit, data over the limit, too many recipients.
with smtplib.SMTP(host, port, local_hostname="py.test") as s:
    s.ehlo()
    code, reply = s.mail("app@example.org", ["SIZE=99999999"])
    report("size-param", code, reply)
    s.rset()
    s.mail("app@example.org")
    s.rcpt("user@remote.test")
    code, reply = s.data(message("big") + ("x" * 900 + "\r\n") * 100)
    report("size-data", code, reply)
    s.mail("app@example.org")
    codes = [s.rcpt("r%d@remote.test" % i)[0] for i in range(6)]
    report("rcpt-limit", codes[-1], str(codes))
    s.rset()
