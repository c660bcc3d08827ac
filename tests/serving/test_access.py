"""Who may do what (roles, keys), what a client frame must look like, and the serve configs."""

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ms_ray.config import DEFAULT_ROLES, ConfigError, RoleConfig, ServeConfig, load_serve_file
from ms_ray.data.skills import SKILL_STREAMS
from ms_ray.serving.access import HTTP_STATUS, Access, AccessPolicy, key_from, parse_frame
from ms_ray.serving.sessions import ServeError

ROOT = Path(__file__).resolve().parents[2]
STREAM_ROLES = {s.name: s.role for s in SKILL_STREAMS.streams}  # user think output tool tool_call
ALL = frozenset(STREAM_ROLES)


def serve_error(code, fn, *args):
    with pytest.raises(ServeError) as info:
        fn(*args)
    assert info.value.code == code, str(info.value)
    assert code in HTTP_STATUS  # every code the checks raise has an HTTP status
    return info.value.message


# ---- roles and keys ------------------------------------------------------------------------
def test_default_roles_over_the_skill_streams():
    policy = AccessPolicy(DEFAULT_ROLES, STREAM_ROLES, "user")
    user, tool, operator, monitor = (policy.by_role[r] for r in ("user", "tool", "operator", "monitor"))
    assert user.write == {"user"} and user.force == frozenset() and user.open
    assert user.read == ALL - {"think"}
    assert monitor.read == ALL and "think" in monitor.read
    assert monitor.write == frozenset() and monitor.force == frozenset() and not monitor.open
    assert tool.write == {"tool"} and tool.read == {"tool_call", "tool"} and not tool.open
    assert operator.write == {"user"}  # "system" is not a stream of this schema: left out
    assert operator.read == ALL - {"think"}
    assert policy.resolve(None) is user  # anonymous clients get the anonymous role


def test_check_write_codes_and_messages():
    policy = AccessPolicy(DEFAULT_ROLES, STREAM_ROLES, "user")
    user, tool, monitor = policy.by_role["user"], policy.by_role["tool"], policy.by_role["monitor"]
    assert user.check_write("user", STREAM_ROLES) is False
    assert tool.check_write("tool", STREAM_ROLES) is False
    assert "'nope'" in serve_error("unknown_stream", user.check_write, "nope", STREAM_ROLES)
    assert "'output'" in serve_error("output_stream", user.check_write, "output", STREAM_ROLES)
    assert "'think'" in serve_error("output_stream", monitor.check_write, "think", STREAM_ROLES)
    message = serve_error("forbidden", user.check_write, "tool", STREAM_ROLES)
    assert "'user'" in message and "'tool'" in message
    assert "'tool'" in serve_error("forbidden", monitor.check_write, "tool", STREAM_ROLES)
    assert "'user'" in serve_error("forbidden", tool.check_write, "user", STREAM_ROLES)


def test_force_lets_a_role_write_an_output_stream():
    roles = {"op": RoleConfig(write=["user"], force=["tool_call", "output"])}
    op = AccessPolicy(roles, STREAM_ROLES, "op").by_role["op"]
    assert op.force == {"tool_call", "output"}
    assert op.check_write("tool_call", STREAM_ROLES) is True
    assert op.check_write("output", STREAM_ROLES) is True
    assert op.check_write("user", STREAM_ROLES) is False
    serve_error("output_stream", op.check_write, "think", STREAM_ROLES)  # not in its force list
    # force names an input stream: that does not grant writing it
    odd = AccessPolicy({"x": RoleConfig(force=["tool"])}, STREAM_ROLES, None).by_role["x"]
    serve_error("forbidden", odd.check_write, "tool", STREAM_ROLES)


def test_read_lists_and_hidden():
    roles = {
        "a": RoleConfig(read=["user", "output", "ghost"]),  # unknown names are dropped
        "b": RoleConfig(read=["*"], hidden=["think", "tool_call"]),
        "c": RoleConfig(read=[]),
    }
    policy = AccessPolicy(roles, STREAM_ROLES, None)
    assert policy.by_role["a"].read == {"user", "output"}
    assert policy.by_role["b"].read == ALL - {"think", "tool_call"}
    assert policy.by_role["c"].read == frozenset()


def test_keys_literal_and_from_the_environment(monkeypatch):
    monkeypatch.setenv("MS_RAY_TEST_MONITOR_KEY", "m-secret")
    monkeypatch.delenv("MS_RAY_TEST_UNSET_KEY", raising=False)
    monkeypatch.setenv("MS_RAY_TEST_EMPTY_KEY", "")
    roles = {
        "user": RoleConfig(keys=["u-literal"], write=["user"]),
        "monitor": RoleConfig(keys=["env:MS_RAY_TEST_MONITOR_KEY", "env:MS_RAY_TEST_UNSET_KEY"], open=False),
        "tool": RoleConfig(keys=["env:MS_RAY_TEST_EMPTY_KEY"], write=["tool"]),
    }
    policy = AccessPolicy(roles, STREAM_ROLES, None)
    assert policy.resolve("u-literal").role == "user"
    assert policy.resolve("m-secret").role == "monitor"
    assert set(policy.by_key) == {"u-literal", "m-secret"}  # unset / empty variables are skipped
    # the variable's name is not itself a key
    assert "unknown API key" in serve_error("unauthorized", policy.resolve, "env:MS_RAY_TEST_MONITOR_KEY")
    assert "unknown API key" in serve_error("unauthorized", policy.resolve, "MS_RAY_TEST_UNSET_KEY")
    assert "unknown API key" in serve_error("unauthorized", policy.resolve, "wrong")
    for no_key in (None, ""):
        assert "API key is required" in serve_error("unauthorized", policy.resolve, no_key)


def test_anonymous_role_and_known_key_together():
    roles = {"user": RoleConfig(write=["user"]), "monitor": RoleConfig(keys=["k"], open=False)}
    policy = AccessPolicy(roles, STREAM_ROLES, "user")
    assert policy.resolve(None).role == "user"
    assert policy.resolve("k").role == "monitor"
    serve_error("unauthorized", policy.resolve, "not-a-key")  # a wrong key never falls back to anonymous


def test_one_key_for_two_roles_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="'user' and 'monitor'"):
        AccessPolicy({"user": RoleConfig(keys=["same"]), "monitor": RoleConfig(keys=["same"])}, STREAM_ROLES, None)
    monkeypatch.setenv("MS_RAY_TEST_SAME", "same")  # also when one of them comes from the environment
    with pytest.raises(ValueError):
        AccessPolicy({"user": RoleConfig(keys=["same"]), "monitor": RoleConfig(keys=["env:MS_RAY_TEST_SAME"])},
                     STREAM_ROLES, None)
    # the same key twice in one role is fine
    policy = AccessPolicy({"user": RoleConfig(keys=["same", "same"])}, STREAM_ROLES, None)
    assert policy.resolve("same").role == "user"


def test_access_is_immutable():
    access = Access("r", True, frozenset({"user"}), frozenset(), ALL)
    with pytest.raises(Exception):
        access.role = "other"


# ---- keys from a request -------------------------------------------------------------------
@pytest.mark.parametrize("headers, query, expected", [
    ({"authorization": "Bearer abc"}, {}, "abc"),
    ({"authorization": "bearer  abc  "}, {}, "abc"),
    ({"authorization": "BEARER abc"}, {"key": "q"}, "abc"),  # the header wins
    ({"authorization": "Bearer abc", "x-api-key": "x"}, {}, "abc"),
    ({"x-api-key": "x"}, {}, "x"),
    ({"x-api-key": "x"}, {"key": "q"}, "x"),
    ({}, {"key": "q"}, "q"),
    ({"authorization": "Basic dXNlcjpwYXNz"}, {"key": "q"}, "q"),  # not a bearer token: ignored
    ({"authorization": "Basic dXNlcjpwYXNz"}, {}, None),
    ({}, {}, None),
    ({"x-api-key": ""}, {}, None),
])
def test_key_from(headers, query, expected):
    assert key_from(headers, query) == expected


# ---- client frames -------------------------------------------------------------------------
def test_valid_frames_pass():
    frame = {"type": "append", "stream": "user", "text": "héllo 日本"}
    assert parse_frame(json.dumps(frame), 1000) == frame
    assert parse_frame(json.dumps(frame).encode("utf-8"), 1000) == frame  # bytes are UTF-8
    assert parse_frame(json.dumps(frame, ensure_ascii=False).encode("utf-8"), 1000) == frame
    assert parse_frame('{"type": "close"}', 1000) == {"type": "close"}
    assert parse_frame(b'{"type":"append","stream":"user","text":""}', 1000)["text"] == ""


def test_size_limit_counts_bytes_not_characters():
    text = json.dumps({"type": "append", "stream": "user", "text": "日本"}, ensure_ascii=False)
    size = len(text.encode("utf-8"))
    assert size > len(text)
    assert parse_frame(text, size)["text"] == "日本"  # exactly at the limit
    message = serve_error("too_large", parse_frame, text, size - 1)
    assert f"{size} bytes" in message and str(size - 1) in message
    assert f"{size} bytes" in serve_error("too_large", parse_frame, text.encode("utf-8"), len(text))
    # the limit comes before any parsing: an oversized frame of garbage is too_large, not bad_json
    serve_error("too_large", parse_frame, b"\xff" * 100, 10)


def test_bad_utf8_and_bad_json():
    assert "UTF-8" in serve_error("bad_utf8", parse_frame, b'{"type": "close"}\xff', 1000)
    assert "byte 0" in serve_error("bad_utf8", parse_frame, b"\xc3\x28", 1000)
    message = serve_error("bad_json", parse_frame, '{"type": "close"', 1000)
    assert "line 1" in message and "column" in message
    serve_error("bad_json", parse_frame, "", 1000)
    serve_error("bad_json", parse_frame, b"not json", 1000)


@pytest.mark.parametrize("raw, mentions", [
    (None, "empty frame"),
    ("[1, 2]", "list"),
    ('"append"', "str"),
    ("42", "int"),
    ("null", "NoneType"),
    ("{}", "None"),  # no type
    ('{"type": "delete"}', "'delete'"),
    ('{"type": 5}', "5"),
    ('{"type": "append", "text": "hi"}', "'stream'"),
    ('{"type": "append", "stream": "user"}', "'text'"),
    ('{"type": "append", "stream": 5, "text": "hi"}', "'stream'"),
    ('{"type": "append", "stream": "user", "text": null}', "'text'"),
    ('{"type": "append", "stream": "user", "text": ["a"]}', "'text'"),
    ('{"type": "append", "stream": "user", "text": "hi", "force": true}', "'force'"),
    ('{"type": "append", "stream": "user", "text": "hi", "end": "yes"}', "'end'"),
    ('{"type": "append", "stream": "user", "text": "hi", "b": 1, "a": 2}', "['a', 'b']"),
    ('{"type": "close", "session": "x"}', "'session'"),
])
def test_bad_frames_name_the_problem(raw, mentions):
    message = serve_error("bad_frame", parse_frame, raw, 1000)
    assert mentions in message


# ---- serve configs -------------------------------------------------------------------------
def test_shipped_serve_files_load():
    local, tree = load_serve_file(ROOT / "serve/local.yaml", check_paths=False)
    assert isinstance(local, ServeConfig) and tree["applications"][0]["args"]["checkpoint"] == local.checkpoint
    assert local.ingress.anonymous_role == "user"
    assert (local.host, local.port, local.name, local.route_prefix) == ("127.0.0.1", 8000, "ms_ray", "/")
    assert local.session.row_interval_s == 0.1 and local.model.num_gpus == 0
    cluster, _ = load_serve_file(ROOT / "serve/cluster.yaml", check_paths=False)
    assert cluster.ingress.anonymous_role is None
    assert cluster.model.num_gpus == 1 and cluster.model.max_replicas == 4
    assert cluster.host == "0.0.0.0" and cluster.dtype == "bfloat16"
    for cfg in (local, cluster):
        assert set(cfg.roles) == set(DEFAULT_ROLES)
        for name, role in cfg.roles.items():  # the shipped roles grant what the defaults grant
            default = DEFAULT_ROLES[name]
            fields = ("open", "write", "read", "hidden")
            assert [getattr(role, f) for f in fields] == [getattr(default, f) for f in fields]
            # no literal secrets in the files: a literal key only where it grants what no key grants
            # (serve/local.yaml's `local`, for clients that must send a key, like the OpenAI SDKs)
            assert all(k.startswith("env:") for k in role.keys) or name == cfg.ingress.anonymous_role
        AccessPolicy(cfg.roles, STREAM_ROLES, cfg.ingress.anonymous_role)  # builds with unset env keys


def test_shipped_local_checkpoint_is_checked_when_asked(tmp_path):
    text = (ROOT / "serve/local.yaml").read_text().replace("runs/train/tiny/export", str(tmp_path / "missing"))
    path = tmp_path / "local.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="does not exist"):
        load_serve_file(path)
    load_serve_file(path, check_paths=False)


def write_serve(tmp_path, **args):
    base = yaml.safe_load((ROOT / "serve/local.yaml").read_text())
    for section, values in args.items():
        if isinstance(values, dict):
            base["applications"][0]["args"].setdefault(section, {}).update(values)
        else:
            base["applications"][0]["args"][section] = values
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize("args, field", [
    ({"session": {"row_interval_s": -1}}, "session.row_interval_s"),
    ({"session": {"max_rows": "many"}}, "session.max_rows"),
    ({"session": {"bogus": 1}}, "session.bogus"),
    ({"model": {"num_gpus": -1}}, "model.num_gpus"),
    ({"ingress": {"max_frame_bytes": 0}}, "ingress.max_frame_bytes"),
    ({"roles": {"user": {"write": "user", "oops": 1}}}, "roles.user.oops"),
    ({"port": 70000}, "port"),
])
def test_bad_field_names_file_and_dotted_field(tmp_path, args, field):
    path = write_serve(tmp_path, **args)
    with pytest.raises(ConfigError) as info:
        load_serve_file(path, check_paths=False)
    message = str(info.value)
    assert str(path) in message and "applications[0].args" in message
    assert field in message


def test_bad_override_names_the_field():
    with pytest.raises(ConfigError) as info:
        load_serve_file(ROOT / "serve/local.yaml", ["session.max_rows=0"], check_paths=False)
    assert "local.yaml" in str(info.value) and "session.max_rows" in str(info.value)
    cfg, _ = load_serve_file(ROOT / "serve/local.yaml", ["session.max_rows=7"], check_paths=False)
    assert cfg.session.max_rows == 7


def test_anonymous_role_must_be_a_role(tmp_path):
    path = write_serve(tmp_path, ingress={"anonymous_role": "guest"})
    with pytest.raises(ConfigError, match="'guest'"):
        load_serve_file(path, check_paths=False)
    # removing the role the default anonymous_role names fails too
    with pytest.raises(ValidationError, match="anonymous_role"):
        ServeConfig.model_validate({"checkpoint": "x", "roles": {"monitor": {}}}, context={"check_paths": False})
    ok = ServeConfig.model_validate({"checkpoint": "x", "roles": {"monitor": {}}, "ingress": {"anonymous_role": None}},
                                    context={"check_paths": False})
    assert ok.ingress.anonymous_role is None


def test_replica_bounds(tmp_path):
    path = write_serve(tmp_path, model={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ConfigError, match=r"max_replicas \(2\) < min_replicas \(3\)"):
        load_serve_file(path, check_paths=False)
    cfg, _ = load_serve_file(write_serve(tmp_path, model={"min_replicas": 2, "max_replicas": 2}), check_paths=False)
    assert cfg.model.min_replicas == cfg.model.max_replicas == 2


def test_serve_file_shape_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_serve_file(tmp_path / "nope.yaml")
    path = tmp_path / "bad.yaml"
    for text in ("", "applications: []", "applications: [{name: x}]", "- 1\n- 2\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="applications"):
            load_serve_file(path, check_paths=False)
