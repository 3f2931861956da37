"""The daemon's hand-written validator (protocol.py) agrees with the pydantic schema
(protocol_models.py) on every line: the same params accepted with the same values, or
the same error (code, id, whether it is answered, message and data).

Only parse errors may word their message differently: the schema's JSON parser and the
standard library's describe broken JSON in their own words (docs/protocol.md shows the
daemon's). And the daemon must not load pydantic for any of this."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supd import protocol, protocol_models
from supd.protocol import ErrorCode, ErrorResponse, Request


def agree(line: bytes) -> Request | ErrorResponse:
    """Both parsers' verdicts on `line`, asserted equal; the daemon's is returned."""
    hand = protocol.parse_request(line)
    reference = protocol_models.parse_request(line)
    if isinstance(reference, protocol_models.ModelRequest):
        assert isinstance(hand, Request), (line, hand, reference)
        assert (hand.id, hand.method, hand.notification) == (
            reference.id,
            reference.method,
            reference.notification,
        )
        assert type(hand.params).__name__ == type(reference.params).__name__
        # repr: 5 and 5.0 are equal, but a float field must hold a float either way.
        assert repr(dataclasses.asdict(hand.params)) == repr(reference.params.model_dump())
        assert hand.params == protocol.SHAPES[hand.method].params(**reference.params.model_dump())
    else:
        assert isinstance(hand, ErrorResponse), (line, hand, reference)
        assert (hand.code, hand.id, hand.notification) == (
            reference.code,
            reference.id,
            reference.notification,
        ), (line, hand, reference)
        if hand.code != ErrorCode.PARSE_ERROR:
            assert (hand.message, hand.data) == (reference.message, reference.data), line
    return hand


def request(method: Any, params: Any = None, **envelope: Any) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method, **envelope}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


# Per method: params that are valid, then params that are not (one fault each, mostly).
CASES: dict[str, tuple[list[Any], list[Any]]] = {
    "status": (
        [None, {}, {"names": ["web", "db:1"]}, {"names": None}, {"accounting": True}],
        [[], {"names": []}, {"names": [""]}, {"names": "web"}, {"accounting": 1},
         {"names": [1, None]}, {"typo": 1}, "x", 0],
    ),
    "start": (
        [{"names": ["all"]}, {"names": ["a"], "wait": False}],
        [None, {}, {"names": None}, {"names": ["a"], "wait": "yes"}, {"names": ["a"], "x": 1},
         {"names": ["a", ""]}, {"wait": True}],
    ),
    "stop": ([{"names": ["a"], "wait": True}], [{"names": []}, {"names": ["a"], "force": True}]),
    "restart": ([{"names": ["a"]}], [{"names": [["a"]]}, {"names": {}}]),
    "signal": (
        [{"signal": "HUP", "names": ["w"]}, {"signal": "sigterm", "names": ["w"]},
         {"signal": 9, "names": ["w"]}, {"signal": "15", "names": ["w"]},
         {"signal": "RTMIN+2", "names": ["w"]}, {"signal": " usr1 ", "names": ["w"]}],
        [{"signal": "NOPE", "names": ["w"]}, {"signal": 999, "names": ["w"]},
         {"signal": True, "names": ["w"]}, {"signal": 1.5, "names": ["w"]},
         {"signal": None, "names": ["w"]}, {"signal": "HUP"}, {"names": ["w"]},
         {"signal": "\u0661\u0665", "names": ["w"]}, {"signal": -1, "names": ["w"]},
         {"signal": "RTMIN+999", "names": ["w"]}, {"signal": "NOPE", "names": []}],
    ),
    "reload": ([None, {}, {"dry_run": True}], [{"dry_run": None}, {"now": True}, []]),
    "tail": (
        [{"name": "w"}, {"name": "w", "lines": 100}, {"names": ["w", "x"], "follow": True},
         {"name": "w", "stream": "stderr", "bytes": 10, "follow": True},
         {"name": "w", "bytes": 0}, {"name": "w", "bytes": protocol.MAX_TAIL_BYTES},
         {"name": "w", "since": 5}, {"name": "w", "since": 0.5}, {"name": "w", "since": 0},
         {"name": "w", "lines": None, "bytes": None, "since": None, "names": None}],
        [None, {}, {"name": "w", "bytes": -1}, {"name": "w", "bytes": protocol.MAX_TAIL_BYTES + 1},
         {"name": "w", "lines": -1}, {"name": "w", "lines": 1, "bytes": 1},
         {"name": "w", "since": 1, "lines": 1}, {"name": "w", "since": -1},
         {"name": "w", "since": 1e12}, {"name": "w", "since": True}, {"name": "w", "since": "1"},
         {"name": "w", "stream": "both"}, {"name": "w", "stream": 5}, {"name": "w", "bytes": 1.0},
         {"name": "w", "names": ["w"]}, {"names": []}, {"name": 5}, {"name": "w", "follow": 0},
         {"stream": 5, "bytes": "x", "extra": 1}],
    ),
    "logs": ([None, {"names": ["a"], "rotate": True}], [{"rotate": "yes"}, {"names": [""]}]),
    "maintail": (
        [None, {"lines": 0}, {"lines": 100_000, "follow": True}, {"lines": None}],
        [{"lines": -1}, {"lines": 100_001}, {"lines": 1.5}, {"follow": None}],
    ),
    "pid": ([None, {}, {"name": "web:0"}, {"name": None}], [{"name": 1}, {"names": ["a"]}]),
    "version": ([None, {}], [{"x": 1}, [], "v"]),
    "shutdown": ([None, {}], [{"now": True}]),
    "wait": (
        [{"names": ["a"]}, {"names": ["a"], "condition": "completed"}],
        [{"names": ["a"], "condition": "done"}, {"names": ["a"], "condition": None}, {}],
    ),
    "deaths": (
        [{"name": "a"}, {"name": "a", "limit": 1}, {"name": "a", "limit": 20}],
        [{"name": "a", "limit": 0}, {"name": "a", "limit": 21}, {"name": "a", "limit": None},
         {"limit": 3}, {"name": None}, None],
    ),
    "clear": ([{"names": ["all"]}], [{"names": []}, {}, None]),
    "metrics": ([None, {}], [{"format": "json"}]),
    "usage": ([None, {"names": ["a"]}], [{"names": "a"}]),
    "avail": ([None, {}], [{"all": True}]),
    "reexec": ([None, {}], [{"force": True}]),
}  # fmt: skip


def test_every_method_has_cases() -> None:
    assert set(CASES) == set(protocol.METHODS) == set(protocol.SHAPES)
    assert set(protocol.METHODS) == set(protocol_models.RESULT_TYPES)


@pytest.mark.parametrize(
    ("method", "params"),
    [(method, params) for method, (good, _) in CASES.items() for params in good],
)
def test_valid_params_give_the_same_request(method: str, params: Any) -> None:
    assert isinstance(agree(request(method, params)), Request)
    assert isinstance(agree(request(method, params, id="x")), Request)
    notification = json.loads(request(method, params))
    del notification["id"]
    assert agree(json.dumps(notification).encode()).notification  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("method", "params"),
    [(method, params) for method, (_, bad) in CASES.items() for params in bad],
)
def test_invalid_params_give_the_same_error(method: str, params: Any) -> None:
    answer = agree(request(method, params))
    assert isinstance(answer, ErrorResponse)
    assert answer.code == ErrorCode.INVALID_PARAMS
    # The same fault next to an envelope fault is an invalid request listing both.
    assert agree(request(method, params, extra=1)).code == ErrorCode.INVALID_REQUEST
    assert agree(request(method, params, id=True)).code == ErrorCode.INVALID_REQUEST
    silent = json.loads(request(method, params))
    del silent["id"]
    assert agree(json.dumps(silent).encode()).notification  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"\xff\xfe",
        b"nul\x00l",
        b'"\xc3"',
        b"\xef\xbb\xbf{}",
        b"[]",
        b"42",
        b"null",
        b'"pid"',
        b'{"jsonrpc":"2.0","id":1,"method":',
        b'{"jsonrpc":"2.0","id":1,"method":"pid"} x',
        b'{"jsonrpc":"2.0","id":1,"method":"pid"}\r\n',
        b' \t{"jsonrpc":"2.0","id":1,"method":"pid"}\n',
        b'[{"jsonrpc":"2.0","id":1,"method":"pid"}]',
        b'{"id":1,"method":"pid"}',
        b'{"jsonrpc":2.0,"id":1,"method":"pid"}',
        b'{"jsonrpc":"2.0","id":1}',
        b'{"jsonrpc":"2.0","id":1,"method":["pid"]}',
        b'{"jsonrpc":"2.0","id":1,"method":null}',
        b'{"jsonrpc":"2.0","id":1,"method":"frob"}',
        b'{"jsonrpc":"2.0","method":"frob"}',
        b'{"jsonrpc":"2.0","id":1,"method":"pid","extra":1}',
        b'{"jsonrpc":"2.0","id":true,"method":"pid"}',
        b'{"jsonrpc":"2.0","id":1.5,"method":"pid"}',
        b'{"jsonrpc":"2.0","id":1e2,"method":"pid"}',
        b'{"jsonrpc":"2.0","id":NaN,"method":"pid"}',
        b'{"jsonrpc":"2.0","id":[],"method":"pid"}',
        b'{"jsonrpc":"2.0","id":null,"method":"pid"}',
        b'{"jsonrpc":"2.0","id":-0,"method":"pid"}',
        b'{"jsonrpc":"2.0","id":99999999999999999999999999,"method":"pid"}',
        b'{"jsonrpc":"2.0","id":"\\ud800","method":"pid"}',
        b'{"jsonrpc":"2.0","id":"\\ud83d\\ude00","method":"pid"}',
        b'{"jsonrpc":"2.0","id":1,"method":"pid","params":{"name":"\\udfff"}}',
        b'{"jsonrpc":"2.0","id":1,"id":2,"method":"pid"}',
        b'{"jsonrpc":"2.0","id":1,"method":"pid","params":{"name":"a"},"params":{}}',
        b'{"jsonrpc":"2.0","id":[],"method":"start","params":{},"x":1,"y":2}',
        b'{"jsonrpc":"2.0","y":1,"id":1,"method":"start","params":{"z":1,"names":["a",3,""]}}',
        b'{"jsonrpc":"2.0","method":"start","params":{"names":[]},"x":1}',
        b'{"jsonrpc":"2.0","id":1,"method":"tail","params":{"name":"w","since":NaN}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tail","params":{"name":"w","since":-Infinity}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tail","params":{"name":"w","bytes":1e999}}',
        b'{"jsonrpc":"2.0","id":1,"method":"signal","params":{"names":["a"],"signal":1e400}}',
        b'{"jsonrpc":"2.0","id":1,"method":"signal","params":{"names":["a"],"signal":99999999999}}',
        b'{"jsonrpc":"2.0","id":1,"method":"pid","params":[]}',
        b'{"jsonrpc":"2.0","id":1,"method":"pid","params":null}',
        b'{"jsonrpc":"2.0","id":1,"method":"pid","params":"x"}',
        b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"pid"}',
        b'{"jsonrpc":"2.0","id":1,"method":"signal","params":{"names":["a"],"signal":"'
        + b"9" * 5000
        + b'"}}',
        b"[" * 100_000 + b"]" * 100_000,
        # Nesting around pydantic's limit (201 levels), in params and elsewhere.
        b'{"jsonrpc":"2.0","id":1,"method":"pid","params":{"name":'
        + b"[" * 199
        + b"]" * 199
        + b"}}",
        b'{"jsonrpc":"2.0","id":1,"method":"pid","params":{"name":'
        + b"[" * 200
        + b"]" * 200
        + b"}}",
        b'{"jsonrpc":"2.0","id":1,"method":"pid","x":' + b'{"a":' * 200 + b"1" + b"}" * 200 + b"}",
        b"[" * 201 + b"]" * 201,
        b"[" * 202 + b"]" * 202,
        b'{"jsonrpc":"2.0","id":1,"method":"start","params":{"names":'
        + b"[" * 600
        + b"]" * 600
        + b"}}",
        # Integers beyond a float's range where a number is wanted.
        b'{"jsonrpc":"2.0","id":1,"method":"tail","params":{"name":"w","since":1'
        + b"0" * 400
        + b"}}",
        b'{"jsonrpc":"2.0","id":1,"method":"tail","params":{"name":"w","since":-1'
        + b"0" * 308
        + b"}}",
    ],
)
def test_lines_get_the_same_answer(raw: bytes) -> None:
    agree(raw)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["HUP", "9", "stdout", "stderr", "ready", "completed", "all", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
_FIELDS = sorted({name for shape in protocol.SHAPES.values() for name, _, _ in shape.fields})
_values = (
    _json
    | st.lists(st.sampled_from(["a", "web:1", "", "all"]) | st.integers(0, 1), max_size=3)
    | st.booleans()
    | st.integers(min_value=-2, max_value=25)
    | st.sampled_from([protocol.MAX_TAIL_BYTES, protocol.MAX_TAIL_BYTES + 1, 100_000, 100_001])
    | st.floats(min_value=-1, max_value=4e8)
)


def _params_of(method: str) -> st.SearchStrategy[Any]:
    """Mostly this method's own fields, so that many of them are accepted."""
    own = [name for name, _, _ in protocol.SHAPES[method].fields] or ["x"]
    keys = st.sampled_from(own) | st.sampled_from(_FIELDS) | st.text(max_size=3)
    return st.dictionaries(st.sampled_from(own), _values, max_size=4) | st.dictionaries(
        keys, _values, max_size=3
    )


@settings(max_examples=500)
@given(
    st.sampled_from(protocol.METHODS).flatmap(
        lambda method: st.fixed_dictionaries(
            {"jsonrpc": st.just("2.0"), "method": st.just(method)},
            optional={"id": st.integers() | st.text(max_size=5), "params": _params_of(method)},
        )
    )
)
def test_hand_parser_agrees_with_the_models_on_params(message: dict[str, Any]) -> None:
    agree(json.dumps(message).encode())


@settings(max_examples=300)
@given(
    st.fixed_dictionaries(
        {"method": st.sampled_from(protocol.METHODS) | _json},
        optional={
            "jsonrpc": st.just("2.0") | _json,
            "id": st.integers() | st.text(max_size=5) | _json,
            "params": st.sampled_from(protocol.METHODS).flatmap(_params_of) | _json,
            "extra": _json,
        },
    )
)
def test_hand_parser_agrees_with_the_models_on_envelopes(message: dict[str, Any]) -> None:
    agree(json.dumps(message).encode())


@settings(max_examples=200)
@given(st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode()))
def test_hand_parser_agrees_with_the_models_on_anything(raw: bytes) -> None:
    agree(raw)


def loaded_pydantic(modules: str, stubbed: tuple[str, ...] = ()) -> list[str]:
    """The pydantic modules that importing `modules` loads in a fresh interpreter, with
    the `stubbed` supd modules replaced by empty stand-ins (any name they are asked
    for is a new class)."""
    code = (
        "import sys, types\n"
        "import supd\n"
        f"for stubbed in {stubbed!r}:\n"
        "    stub = types.ModuleType(stubbed)\n"
        "    stub.__getattr__ = lambda name: type(name, (Exception,), {})\n"
        "    sys.modules[stubbed] = stub\n"
        f"import {modules}\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('pydantic'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_wire_format_and_control_server_do_not_load_pydantic() -> None:
    assert loaded_pydantic("supd.protocol, supd.control") == []


def test_the_commands_do_not_load_pydantic_but_through_the_config() -> None:
    """commands.py imports config.py (ConfigError; fleet and process its ProgramConfig),
    which is pydantic's until the runtime config is plain data: stubbed out here, the
    protocol path is seen to load no pydantic of its own."""
    assert loaded_pydantic("supd.commands, supd.control, supd.protocol", ("supd.config",)) == []


def test_the_daemon_loads_pydantic_only_through_the_config_path() -> None:
    """Everything the daemon imports but config.py and reexec.py (which serialises the
    config across an exec) is free of pydantic: the protocol models never load."""
    stubbed = ("supd.config", "supd.reexec")
    assert loaded_pydantic("supd.daemon", stubbed) == []
    assert "pydantic" in loaded_pydantic("supd.protocol_models")  # the check can fail


_answers = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(st.integers() | st.text(max_size=5), _answers)
def test_answers_are_the_bytes_pydantic_wrote(request_id: int | str, result: Any) -> None:
    """Plain data through json is byte for byte what pydantic_core.to_json wrote (text
    as UTF-8, control characters escaped, one line)."""
    import pydantic_core

    message = {"jsonrpc": "2.0", "id": request_id, "result": result}
    ours = protocol.encode_result(request_id, result)
    assert ours == pydantic_core.to_json(message) + b"\n"
    assert ours.count(b"\n") == 1


@given(st.lists(st.floats(allow_nan=False), max_size=5))
def test_numbers_read_back_as_pydantic_wrote_them(numbers: list[float]) -> None:
    """Floats may be spelled differently (1e-07, 1e-7), never read back differently."""
    import pydantic_core

    ours = protocol.encode_notification("x", numbers)
    theirs = pydantic_core.to_json({"jsonrpc": "2.0", "method": "x", "params": numbers})
    assert json.loads(ours) == json.loads(theirs)


def test_answers_carry_models_dataclasses_enums_and_paths() -> None:
    from pathlib import Path

    info = protocol_models.ProcessInfo(name="w", program="w", state="RUNNING")
    params = protocol.TailParams(name="w")
    raw = protocol.encode_result(1, [info, params, ErrorCode.BAD_STATE, Path("/x"), {"a"}])
    assert json.loads(raw)["result"] == [
        info.model_dump(mode="json"),
        dataclasses.asdict(params),
        2,
        "/x",
        ["a"],
    ]
    assert json.loads(protocol.encode_error("\ud800", 1, "x"))["id"] == "\ud800"
