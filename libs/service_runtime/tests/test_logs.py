import json
import logging

from service_runtime.logs import JsonFormatter, redact


def test_redact_scrubs_runpod_keys_and_bearer_tokens():
    text = "key rpa_ABCDEFGH12345678 and Authorization: Bearer eyJhbGciOi.payload.sig"
    scrubbed = redact(text)
    assert "rpa_ABCDEFGH12345678" not in scrubbed
    assert "eyJhbGciOi.payload.sig" not in scrubbed
    assert scrubbed.count("[REDACTED]") == 2


def test_json_formatter_keeps_extra_fields_and_redacts():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "saved rpa_ZZZZZZZZ99999999", None, None)
    record.job_id = "j1"
    entry = json.loads(JsonFormatter("svc").format(record))
    assert entry["service"] == "svc" and entry["job_id"] == "j1"
    assert "rpa_ZZZZZZZZ99999999" not in entry["message"]
