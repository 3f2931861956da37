"""The wire format: parsing, error mapping, encoding, and the constants scripts rely on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supd import facts, protocol, protocol_models, signals
from supd.protocol import (
    ErrorCode,
    ErrorResponse,
    PidParams,
    ProcessState,
    ReloadParams,
    Request,
    RestartParams,
    ShutdownParams,
    SignalParams,
    StartParams,
    StatusParams,
    StopParams,
    TailParams,
    VersionParams,
    encode_error,
    encode_notification,
    encode_result,
    parse_request,
)
from supd.protocol_models import ActionResult, OutputParams, ProcessInfo


def line(**message: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n"


def parsed(**message: Any) -> Request:
    result = parse_request(line(**message))
    assert isinstance(result, Request), result
    return result


def rejected(raw: bytes) -> ErrorResponse:
    result = parse_request(raw)
    assert isinstance(result, ErrorResponse), result
    return result


# --------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("status", None, StatusParams()),
        ("status", {"names": ["web", "db:1"]}, StatusParams(names=["web", "db:1"])),
        ("start", {"names": ["all"]}, StartParams(names=["all"], wait=True)),
        ("stop", {"names": ["web"], "wait": False}, StopParams(names=["web"], wait=False)),
        ("restart", {"names": ["web"]}, RestartParams(names=["web"])),
        ("signal", {"signal": "HUP", "names": ["w"]}, SignalParams(signal="SIGHUP", names=["w"])),
        ("reload", {}, ReloadParams()),
        ("tail", {"name": "web:0"}, TailParams(name="web:0", stream="stdout", bytes=None)),
        ("tail", {"name": "w", "lines": 100}, TailParams(name="w", lines=100)),
        ("tail", {"name": "w", "stream": "stderr", "bytes": 10, "follow": True},
         TailParams(name="w", stream="stderr", bytes=10, follow=True)),
        ("pid", None, PidParams()),
        ("pid", {"name": "web:0"}, PidParams(name="web:0")),
        ("version", None, VersionParams()),
        ("shutdown", {}, ShutdownParams()),
    ],
)  # fmt: skip
def test_every_method_parses_to_its_params(method: str, params: Any, expected: Any) -> None:
    message: dict[str, Any] = {"id": 1, "method": method}
    if params is not None:
        message["params"] = params
    request = parsed(**message)
    assert request.method == method
    assert request.params == expected
    assert type(request.params) is type(expected)
    assert request.id == 1
    assert not request.notification


def test_every_method_has_a_result_type() -> None:
    assert (
        set(protocol.METHODS)
        == set(protocol_models.RESULT_TYPES)
        == set(protocol_models.RESULT_ADAPTERS)
    )


def test_request_without_id_is_a_notification() -> None:
    request = parsed(method="shutdown")
    assert request.notification
    assert request.id is None


def test_null_id_is_a_request_not_a_notification() -> None:
    request = parsed(id=None, method="pid")
    assert not request.notification
    assert request.id is None


def test_string_ids_are_kept() -> None:
    assert parsed(id="req-1", method="pid").id == "req-1"


def test_line_without_newline_and_with_crlf_parse_alike() -> None:
    raw = b'{"jsonrpc":"2.0","id":1,"method":"pid"}'
    assert parse_request(raw) == parse_request(raw + b"\n") == parse_request(raw + b"\r\n")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("TERM", signal.SIGTERM), ("sigterm", signal.SIGTERM), ("SIGHUP", signal.SIGHUP),
     ("9", signal.SIGKILL), (15, signal.SIGTERM), ("usr1", signal.SIGUSR1)],
)  # fmt: skip
def test_signal_names_and_numbers(value: str | int, expected: signal.Signals) -> None:
    request = parsed(id=1, method="signal", params={"signal": value, "names": ["a"]})
    assert isinstance(request.params, SignalParams)
    assert request.params.signum == expected
    assert request.params.signal == expected.name


def test_realtime_signals_are_accepted_as_numbers_and_names() -> None:
    """The config accepts stopsignal = 40; supctl signal must accept it too."""
    rt = signal.SIGRTMIN + 2
    for value in (rt, str(rt), "RTMIN+2", "SIGRTMIN+2"):
        request = parsed(id=1, method="signal", params={"signal": value, "names": ["a"]})
        assert isinstance(request.params, SignalParams)
        assert (request.params.signum, request.params.signal) == (rt, "SIGRTMIN+2")


@pytest.mark.parametrize("value", ["\u0661\u0665", "\uff11\uff15", "RTMIN+\u0662", "1\u0665"])
def test_signal_numbers_are_ascii_digits_only(value: str) -> None:
    """int() reads "\\u0661\\u0665" (Arabic-Indic digits) as 15: the protocol must not."""
    with pytest.raises(ValueError, match="unknown signal"):
        signals.parse(value)
    error = rejected(
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "signal",
                    "params": {"signal": value, "names": ["a"]}}).encode()
    )  # fmt: skip
    assert error.code == ErrorCode.INVALID_PARAMS


# --------------------------------------------------------------------------- errors


def test_malformed_json_is_a_parse_error_with_null_id() -> None:
    error = rejected(b'{"jsonrpc":"2.0","id":1,"method":')
    assert (error.code, error.id, error.notification) == (ErrorCode.PARSE_ERROR, None, False)


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"nul\x00l", b'"\xc3"'])
def test_non_json_bytes_are_parse_errors(raw: bytes) -> None:
    assert rejected(raw).code == ErrorCode.PARSE_ERROR


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"[]", "batch"),
        (b'[{"jsonrpc":"2.0","id":1,"method":"pid"}]', "batch"),
        (b"42", "not an object"),
        (b'{"id":1,"method":"pid"}', '"jsonrpc" must be "2.0"'),
        (b'{"jsonrpc":"2.0","id":1}', "'method' is required"),
        (b'{"jsonrpc":"2.0","id":1,"method":["pid"]}', "'method' must be a string"),
        (b'{"jsonrpc":"2.0","id":1,"method":"pid","extra":1}', "extra: Extra inputs"),
        (b'{"jsonrpc":"2.0","id":true,"method":"pid"}', "id"),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"pid"}', "id"),
    ],
)
def test_invalid_requests(raw: bytes, fragment: str) -> None:
    error = rejected(raw)
    assert error.code == ErrorCode.INVALID_REQUEST
    assert fragment in error.message
    assert not error.notification  # an invalid request is always answered


def test_invalid_request_keeps_a_usable_id() -> None:
    assert rejected(b'{"jsonrpc":"2.0","id":"x","method":"pid","bad":1}').id == "x"
    assert rejected(b'{"jsonrpc":"2.0","id":true,"method":"pid"}').id is None


def test_unknown_method_lists_the_known_ones() -> None:
    error = rejected(line(id=3, method="frobnicate"))
    assert error.code == ErrorCode.METHOD_NOT_FOUND
    assert error.id == 3
    assert error.data == list(protocol.METHODS)


@pytest.mark.parametrize(
    ("method", "params", "problem"),
    [
        ("start", {}, "names: Field required"),
        ("start", {"names": []}, "names: at least one name is required"),
        ("start", {"names": [""]}, "names: names must not be empty strings"),
        ("start", {"names": "web"}, "names: Input should be a valid array"),
        ("start", {"names": ["web"], "wait": 1}, "wait: Input should be a valid boolean"),
        ("stop", {"names": ["web"], "force": True}, "force: Extra inputs are not permitted"),
        ("tail", {"name": "w", "bytes": -1}, "bytes: Input should be greater than or equal to 0"),
        (
            "tail",
            {"name": "w", "bytes": protocol.MAX_TAIL_BYTES + 1},
            "bytes: Input should be less",
        ),
        ("tail", {"name": "w", "stream": "both"}, "stream: Input should be 'stdout' or 'stderr'"),
        ("tail", {"name": "w", "lines": -1}, "lines: Input should be greater than or equal to 0"),
        ("tail", {"name": "w", "lines": 1, "bytes": 1}, "give bytes or lines, not both"),
        ("signal", {"signal": "NOPE", "names": ["w"]}, "signal: unknown signal 'NOPE'"),
        ("signal", {"signal": 999, "names": ["w"]}, "signal: unknown signal number 999"),
        ("status", [], "Input should be an object"),
        ("reload", {"now": True}, "now: Extra inputs are not permitted"),
    ],
)
def test_invalid_params_name_the_field(method: str, params: Any, problem: str) -> None:
    error = rejected(line(id=1, method=method, params=params))
    assert error.code == ErrorCode.INVALID_PARAMS
    assert error.message.startswith("invalid params: ")
    assert any(problem in entry for entry in error.data), error.data
    assert problem in error.message


@pytest.mark.parametrize("digits", [310, 400, 4000])
@pytest.mark.parametrize("sign", ["", "-"])
def test_an_integer_beyond_floats_range_is_not_a_finite_since(digits: int, sign: str) -> None:
    """float() of a 310-digit int overflows: that is an invalid `since`, with the
    request's id, not an internal error."""
    raw = (
        b'{"jsonrpc":"2.0","id":7,"method":"tail","params":{"name":"w","since":'
        + f"{sign}1{'0' * (digits - 1)}".encode()
        + b"}}"
    )
    error = rejected(raw)
    assert (error.code, error.id) == (ErrorCode.INVALID_PARAMS, 7)
    assert error.data == ["since: Input should be a finite number"]


@pytest.mark.parametrize(("depth", "refused"), [(201, False), (202, True), (500, True)])
def test_nesting_deeper_than_the_schemas_parser_allows_is_a_parse_error(
    depth: int, refused: bool
) -> None:
    """pydantic's JSON parser (the reference, protocol_models) refuses a line nesting
    more than 201 arrays and objects; json.loads goes on to about 1,000. Deeper than
    201 is a parse error here too, wherever the nesting is."""
    inner = depth - 2  # the envelope and params objects are two levels
    raw = (
        b'{"jsonrpc":"2.0","id":1,"method":"pid","params":{"name":'
        + b"[" * inner
        + b"]" * inner
        + b"}}"
    )
    error = rejected(raw)
    if refused:
        assert (error.code, error.id) == (ErrorCode.PARSE_ERROR, None)
        assert "nested too deeply" in error.message
    else:
        assert (error.code, error.id) == (ErrorCode.INVALID_PARAMS, 1)
    # Brackets inside strings are no nesting.
    assert parsed(jsonrpc="2.0", id=1, method="pid", params={"name": "[" * 500}).params == (
        protocol.PidParams(name="[" * 500)
    )


def test_bad_notifications_are_flagged_silent() -> None:
    """JSON-RPC: the server never answers a notification, not even with an error."""
    assert rejected(line(method="frobnicate")).notification
    assert rejected(line(method="start", params={})).notification
    assert not rejected(line(id=1, method="frobnicate")).notification


@given(st.binary(max_size=500))
def test_parse_request_never_raises_on_bytes(raw: bytes) -> None:
    result = parse_request(raw)
    assert isinstance(result, Request | ErrorResponse)
    if isinstance(result, ErrorResponse):
        assert result.encode().endswith(b"\n")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=10,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "jsonrpc": st.just("2.0") | _json,
            "id": _json,
            "method": st.sampled_from(protocol.METHODS) | _json,
            "params": _json,
        },
    )
)
def test_parse_request_never_raises_on_json(message: dict[str, Any]) -> None:
    result = parse_request(json.dumps(message).encode())
    if isinstance(result, ErrorResponse):
        answer = json.loads(result.encode())
        assert answer["error"]["code"] == result.code
        assert answer["id"] == result.id


# --------------------------------------------------------------------------- encoding


def test_encode_result_serialises_models() -> None:
    info = ProcessInfo(name="web:0", program="web", state="RUNNING", pid=1, uptime=2.5)
    raw = encode_result(1, [info])
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    answer = json.loads(raw)
    assert answer["id"] == 1
    assert answer["result"][0]["state"] == "RUNNING"
    assert protocol_models.RESULT_ADAPTERS["status"].validate_python(answer["result"]) == [info]


def test_encode_result_accepts_plain_values() -> None:
    assert json.loads(encode_result("a", {"ok": True})) == {
        "jsonrpc": "2.0",
        "id": "a",
        "result": {"ok": True},
    }


def test_encode_error_omits_absent_data() -> None:
    assert json.loads(encode_error(None, ErrorCode.BAD_STATE, "no")) == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": 2, "message": "no"},
    }
    answer = json.loads(encode_error(4, ErrorCode.CONFIG_INVALID, "bad", ["a: b"]))
    assert answer["error"]["data"] == ["a: b"]


def test_encode_notification() -> None:
    raw = encode_notification("output", OutputParams(name="w", stream="stdout", data="a\nb"))
    assert raw.count(b"\n") == 1, "a newline inside data must be escaped"
    assert json.loads(raw) == {
        "jsonrpc": "2.0",
        "method": "output",
        "params": {"name": "w", "stream": "stdout", "data": "a\nb"},
    }


def test_lone_surrogates_are_escaped_not_fatal() -> None:
    assert json.loads(encode_error("\ud800", 1, "x"))["id"] == "\ud800"


def test_unserialisable_results_raise() -> None:
    with pytest.raises(Exception, match="serializ"):
        encode_result(1, object())


def test_results_are_lax_for_the_daemon() -> None:
    assert ActionResult(name="a", ok=True, state="RUNNING").state is ProcessState.RUNNING
    with pytest.raises(ValueError, match="Extra inputs"):
        ActionResult(name="a", ok=True, typo=1)  # type: ignore[call-arg]


# --------------------------------------------------------------------------- constants


def test_exit_statuses_and_error_codes_are_fixed() -> None:
    """Scripts depend on these numbers (facts.py holds them for supd and supctl)."""
    assert (
        facts.EXIT_OK,
        facts.EXIT_FAILED,
        facts.EXIT_USAGE,
        facts.EXIT_NOT_RUNNING,
        facts.EXIT_UNREACHABLE,
        facts.EXIT_TIMED_OUT,
    ) == (0, 1, 2, 3, 4, 5)
    assert [int(code) for code in ErrorCode if code > 0] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert ErrorCode.SUPERSEDED == 8


def test_error_codes_are_fixed() -> None:
    assert {code.name: int(code) for code in ErrorCode} == {
        "PARSE_ERROR": -32700,
        "INVALID_REQUEST": -32600,
        "METHOD_NOT_FOUND": -32601,
        "INVALID_PARAMS": -32602,
        "INTERNAL_ERROR": -32603,
        "NO_SUCH_PROCESS": 1,
        "BAD_STATE": 2,
        "PERMISSION_DENIED": 3,
        "CONFIG_INVALID": 4,
        "SHUTTING_DOWN": 5,
        "TOO_MANY_CONNECTIONS": 6,
        "REQUEST_TOO_LARGE": 7,
        "SUPERSEDED": 8,
        "REEXEC_FAILED": 9,
    }


def test_protocol_imports_no_io_modules() -> None:
    code = (
        "import sys, supd.protocol; "
        "bad = [m for m in ('supd.selector', 'supd.linux', 'supd.daemon',"
        " 'supd.control', 'ctypes') if m in sys.modules]; print(bad)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
