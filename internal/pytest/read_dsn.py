"""Reads a delivery status notification from stdin with Python's email
package and flufl.bounce, and prints what they found as JSON: an
independent parse of our DSNs for the Go tests."""
import json
import sys
import email
import email.policy

raw = sys.stdin.buffer.read()
out = {"lines_ok": all(len(l) <= 998 for l in raw.split(b"\r\n")),
       "bare_lf": b"\n" in raw.replace(b"\r\n", b""),
       "headers": {}, "parts": [], "per_message": {}, "recipients": []}
m = email.message_from_bytes(raw, policy=email.policy.default)
for k in m.keys():
    out["headers"][k] = str(m[k])
out["content_type"] = m.get_content_type()
out["report_type"] = m.get_param("report-type")
for part in m.iter_parts():
    ct = part.get_content_type()
    entry = {"type": ct}
    if ct == "text/plain":
        entry["text"] = part.get_content()
    elif ct in ("message/delivery-status", "message/global-delivery-status"):
        blocks = part.get_payload()
        if ct == "message/global-delivery-status":
            # email parses it as one embedded message: take its text back.
            text = blocks[0].as_bytes().decode("utf-8") if isinstance(blocks, list) else part.get_payload(decode=True).decode("utf-8")
            blocks = [email.message_from_string(b.strip() + "\n", policy=email.policy.default)
                      for b in text.replace("\r\n", "\n").split("\n\n") if b.strip()]
        out["per_message"] = {k: str(v) for k, v in blocks[0].items()}
        out["recipients"] = [{k: str(v) for k, v in b.items()} for b in blocks[1:]]
    elif ct in ("message/rfc822", "message/global"):
        inner = part.get_payload()
        inner = inner[0] if isinstance(inner, list) else email.message_from_bytes(part.get_payload(decode=True))
        entry["subject"] = str(inner["Subject"])
        entry["body"] = inner.get_payload()
    else:
        entry["text"] = part.get_payload(decode=True).decode("utf-8", "replace")
    out["parts"].append(entry)
try:
    from flufl.bounce import scan_message, all_failures
    old = email.message_from_bytes(raw)
    out["flufl_permanent"] = sorted(a.decode() if isinstance(a, bytes) else a for a in scan_message(old))
    out["flufl_all"] = sorted(a.decode() if isinstance(a, bytes) else a for a in (set().union(*all_failures(old)) if all_failures(old) else []))
except ImportError:
    out["flufl_permanent"] = None
print(json.dumps(out))
