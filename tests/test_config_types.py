import math

import pytest
from pydantic import ValidationError

from memory_distill import (
    BinsConfig,
    DistillConfig,
    InvalidMemoryError,
    JobConfig,
    Memory,
    Settings,
    StoreConfig,
)
from memory_distill.store import coerce_memory


def test_unknown_config_key_names_the_key_and_the_nearest_real_one(monkeypatch):
    with pytest.raises(ValidationError, match="temprature\n  Extra inputs are not permitted: did you mean 'temperature'"):
        DistillConfig(temprature=2.0)  # type: ignore[call-arg]
    with pytest.raises(ValidationError) as e:  # nested, next to another error, and with nothing close
        JobConfig(teacher={"epoch": 5}, seed="x", zzz=1)  # type: ignore[arg-type, call-arg]
    got = {".".join(map(str, x["loc"])): (x["type"], x["msg"]) for x in e.value.errors()}
    assert got["teacher.epoch"] == ("extra_forbidden", "Extra inputs are not permitted: did you mean 'epochs'?")
    assert got["seed"][0] == "int_parsing"
    assert got["zzz"][0] == "extra_forbidden" and "(JobConfig takes bins, teacher, distill, gate, seed" in got["zzz"][1]
    monkeypatch.setenv("MEMORY_DISTILL_JOB__TEACHER__EPOCS", "3")  # from the environment: the same hint
    with pytest.raises(ValidationError, match="epocs\n  Extra inputs are not permitted: did you mean 'epochs'"):
        Settings()
    monkeypatch.delenv("MEMORY_DISTILL_JOB__TEACHER__EPOCS")
    # a typo in the first part would otherwise change nothing, silently
    monkeypatch.setenv("MEMORY_DISTILL_JOBB__TEACHER__EPOCHS", "3")
    with pytest.raises(ValueError, match="MEMORY_DISTILL_JOBB__TEACHER__EPOCHS is not a memory_distill setting: "
                                         "did you mean MEMORY_DISTILL_JOB__TEACHER__EPOCHS"):
        Settings()
    monkeypatch.delenv("MEMORY_DISTILL_JOBB__TEACHER__EPOCHS")
    monkeypatch.setenv("MEMORY_DISTILL_FAULT", "none")  # the crash tests' switch is not a setting, and allowed
    monkeypatch.setenv("MEMORY_DISTILL_JOB__TEACHER__EPOCHS", "3")
    assert Settings().job.teacher.epochs == 3


def test_config_ranges_and_frozen():
    with pytest.raises(ValidationError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ValidationError, match="alpha and beta are both 0"):
        DistillConfig(alpha=0, beta=0)
    with pytest.raises(ValidationError, match="reward_min"):
        StoreConfig(reward_min=1, reward_max=0)
    with pytest.raises(ValidationError, match="collection name"):
        StoreConfig(collection="x")
    cfg = JobConfig()
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]


def test_infinite_or_nan_settings_are_refused_where_they_mean_nothing():
    # lr=inf trained to NaN losses; bins low > high, or NaN, failed at training time as a bare ValueError
    for bad in ({"teacher": {"lr": float("inf")}}, {"distill": {"temperature": float("inf")}},
                {"gate": {"tolerance": float("nan")}}, {"bins": {"low": float("-inf")}}):
        with pytest.raises(ValidationError, match="Input should be a finite number"):
            JobConfig.model_validate(bad)
    with pytest.raises(ValidationError, match=r"low \(1.0\) must be below high \(0.0\).*leave both None"):
        BinsConfig(low=1, high=0)
    assert BinsConfig(low=0, high=1).high == 1.0
    # an unbounded reward range is a meaningful setting
    store = StoreConfig(reward_min=float("-inf"), reward_max=float("inf"))
    assert store.reward_min == float("-inf") and store.reward_max == float("inf")
    with pytest.raises(ValidationError, match="must be below reward_max"):
        StoreConfig(reward_min=float("nan"))


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMORY_DISTILL_HOME", str(tmp_path))
    monkeypatch.setenv("MEMORY_DISTILL_STORE__MODE", "http")
    monkeypatch.setenv("MEMORY_DISTILL_JOB__DISTILL__TEMPERATURE", "2.5")
    monkeypatch.setenv("MEMORY_DISTILL_JOB__METADATA_FEATURES", '["agent", "tool"]')
    s = Settings()
    assert s.home == tmp_path and s.store.mode == "http" and s.job.distill.temperature == 2.5
    assert s.job.metadata_features == ("agent", "tool")
    assert s.store_path == tmp_path / "chroma"
    monkeypatch.setenv("MEMORY_DISTILL_JOB__BOGUS", "1")
    with pytest.raises(ValidationError, match="bogus"):
        Settings()
    monkeypatch.delenv("MEMORY_DISTILL_JOB__BOGUS")
    # a list or dict setting that is not JSON: pydantic-settings' own error names only "job"
    monkeypatch.setenv("MEMORY_DISTILL_JOB__METADATA_FEATURES", "agent")
    with pytest.raises(ValueError, match=r"^environment variable MEMORY_DISTILL_JOB__METADATA_FEATURES is not JSON: "
                                         r"this setting takes a JSON list, e\.g\. .*='\[\"agent\"\]'$"):
        Settings()
    monkeypatch.setenv("MEMORY_DISTILL_JOB__METADATA_FEATURES", '["agent"]')
    monkeypatch.setenv("MEMORY_DISTILL_STORE__HEADERS", "Bearer sk-secret")
    with pytest.raises(ValueError, match="MEMORY_DISTILL_STORE__HEADERS is not JSON.*JSON object") as info:
        Settings()
    assert "sk-secret" not in str(info.value)  # credentials are never echoed
    assert JobConfig(metadata_features="agent").metadata_features == ("agent",)  # one key, not its letters
    with pytest.raises(ValidationError, match="namespace '' is empty: give a namespace's name, or None"):
        JobConfig(namespace="")


def test_defaults_match_the_design():
    d, j = DistillConfig(), JobConfig()
    assert (d.temperature, d.alpha, d.beta) == (4.0, 0.7, 0.3)
    assert j.teacher.hidden == (1024, 512, 256, 128) and j.teacher.dropout == 0.2 and j.teacher.batchnorm
    assert d.hidden == (256, 128) and d.dropout == 0.1
    assert j.bins.n_bins == 64 and j.teacher.batch_size == 256
    assert not j.warm_start  # a warm start ranked worse on the real data (BENCHMARKS.md)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"text": "   "}, "text: text is empty"),
        ({"text": None}, "text: text must be a string .the episode's content., got NoneType"),
        ({"reward": 0.5}, "text: Field required .every memory needs a text"),
        ({"text": "x", "created_at": "yesterday"}, "created_at 'yesterday' is neither Unix seconds nor an ISO 8601"),
        ({"text": "x", "created_at": "2026-11-28T09:30:00"}, "created_at 2026-11-28T09:30:00 has no timezone: give one"),
        ({"text": "x", "reward": math.nan}, "reward must be finite"),
        ({"text": "x", "reward": math.inf}, "reward must be finite"),
        ({"text": "x", "reward": "high"}, "reward must be a number"),
        ({"text": "x", "metadata": {"tags": ["a", "b"]}}, "metadata.*must be a str, int, float or bool.*json.dumps"),
        ({"text": "x", "metadata": {"_md_ns": "a"}}, "reserved prefix"),
        ({"text": "x", "metadata": {"$where": "a"}}, "reserved prefix"),
        ({"text": "x", "metadata": {"big": 2**70}}, "64 bits"),
        ({"text": "x", "colour": "red"},
         r"colour: Extra inputs are not permitted: put your own fields in metadata, e.g. metadata=\{'colour': \.\.\.\}"),
        ({"text": "x", "rewrd": 0.5}, "rewrd: Extra inputs are not permitted: did you mean 'reward'"),
        ({"txt": "x"}, "txt: Extra inputs are not permitted: did you mean 'text'"),
        ({"text": "x", "namespace": " "}, r"namespace must be a non-empty string \(a team, user or project name\)"),
        # JavaScript's Date.now() is in milliseconds: taken as seconds, it dated an episode in the year 58,000
        ({"text": "x", "created_at": 1.7e12}, r"created_at 1700000000000.0 is in milliseconds or finer: give seconds"),
        ({"text": "x", "rewarded_at": -1.0}, r"rewarded_at must be a Unix time in seconds"),
        ({"text": "x", "created_at": math.nan}, r"created_at must be a Unix time in seconds"),
        ({"text": "x", "id": "\t"}, "id must be a non-empty string"),
        # a lone surrogate (broken JSON escapes, surrogateescape decoding) has no UTF-8 form: Chroma and every
        # embedder would fail on it with a bare UnicodeEncodeError
        ({"text": "ok \ud800 then"}, r"text holds '\\ud800' at position 3, a lone surrogate.*errors='replace'"),
        ({"text": "x", "namespace": "team-\udcff"}, "namespace holds .* at position 5, a lone surrogate"),
        ({"text": "x", "id": "\udc80"}, "id holds .* at position 0"),
        ({"text": "x", "metadata": {"k": "v\ud800"}}, r"metadata\['k'\] holds .* a lone surrogate"),
        ({"text": "x", "metadata": {"k\ud800": 1}}, r"metadata key 'k\\ud800' holds"),
    ],
)
def test_memory_validation_names_field_and_fix(data, message):
    with pytest.raises(InvalidMemoryError, match=message):
        coerce_memory(data, index=3)
    with pytest.raises(InvalidMemoryError, match=r"memories\[3\]"):
        coerce_memory(data, index=3)


def test_memory_times_may_be_datetimes_or_iso_text():
    """A LangGraph item, a log line or a database row gives times as datetimes or ISO text; "Input should be a valid
    number" sent users to convert them by hand. A time without a timezone could be any of 24 hours: refused above."""
    import datetime as dt

    t = dt.datetime(2026, 11, 28, 9, 30, tzinfo=dt.UTC)
    for given in (t, "2026-11-28T09:30:00Z", "2026-11-28T11:30:00+02:00", t.timestamp(), str(t.timestamp())):
        assert Memory(text="x", created_at=given, rewarded_at=given).created_at == t.timestamp() == 1795858200.0


def test_memory_defaults():
    m = Memory(text="hello")
    assert m.reward is None and not m.has_reward and m.namespace == "default" and len(m.id) == 32
    assert Memory(text="a", reward=1).reward == 1.0
