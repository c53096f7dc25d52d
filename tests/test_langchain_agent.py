"""Real `create_agent` runs (sync and async) on fake chat models, with the memory_distill adapters."""

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import fast_job
from langchain.agents import create_agent
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.tools import tool
from langchain_memory_distill import (
    AnswerGrader,
    EpisodeRecorder,
    MemoryDistillMiddleware,
    RewardRouter,
    RewardScorer,
    ValueAwareRetriever,
    best_of_n,
    make_predict_tool,
    make_recall_tool,
)
from langchain_memory_distill.episodes import input_group
from lc_helpers import ScriptedChatModel, tool_then_answer

from memory_distill import Predictor, run_consolidation
from memory_distill.demo_data import synthetic_episodes


@tool
def lookup(city: str) -> str:
    """Look up the population of a city."""
    return f"{city} has 700,000 people"


@tool
def broken(city: str) -> str:
    """A tool that always fails."""
    raise ConnectionError("upstream API down")


GOOD = "Task: find the population of Oslo in 2020. The agent searched the web, cross-checked two sources and cited them in the answer."
BAD = "Task: find the population of Oslo in 2020. The agent guessed the answer and did not check it."


@pytest.fixture
def trained_store(store, registry):
    store.add_many(synthetic_episodes(500, seed=12))
    run_consolidation(store, registry, fast_job())
    return store, registry, Predictor(registry, store.embedder)


def test_middleware_recalls_into_system_prompt_and_records_episode(trained_store):
    store, _, pred = trained_store
    model = ScriptedChatModel(responses=tool_then_answer("lookup", {"city": "Oslo"}, "Oslo has 700,000 people."))
    grader = AnswerGrader("token_f1", threshold=0.5)
    mw = MemoryDistillMiddleware(store, pred, k=2,
                                 reward_fn=lambda q, a, msgs: grader(a, "Oslo has 700,000 people"))
    agent = create_agent(model, [lookup], system_prompt="You are helpful.", middleware=[mw])
    n0 = store.count()
    out = agent.invoke({"messages": [HumanMessage("find the population of Oslo, search the web and cite")]})
    # recall reached the model: the system prompt holds past episodes with rewards and predictions
    sys_msgs = [m for m in model.seen[0] if isinstance(m, SystemMessage)]
    assert sys_msgs[0].content.startswith("You are helpful.")
    assert "Relevant past episodes" in sys_msgs[0].content and "predicted" in sys_msgs[0].content
    assert sys_msgs[0].content.count("\n- [reward") == 2
    # the run was recorded: input, tool call, tool result, answer, reward from the grader
    assert store.count() == n0 + 1
    ep = store.get(out["memory_distill_episode_id"])
    assert "User: find the population of Oslo" in ep.text and 'Tool call: lookup({"city": "Oslo"})' in ep.text
    assert "Tool result (lookup): Oslo has 700,000 people" in ep.text and "Answer: Oslo has 700,000 people." in ep.text
    assert ep.reward == 1.0 and ep.metadata["outcome"] == "completed" and ep.metadata["tool_calls"] == 1


def test_middleware_started_before_any_model_picks_up_the_first_one(store, registry):
    """A long-running agent attached before the first consolidation: stored rewards first, the student after."""
    from memory_distill import MemoryDistill

    mem = MemoryDistill(store, registry, fast_job())
    mem.add_many(synthetic_episodes(300, seed=4))
    assert mem.try_predictor() is None and mem.try_predictor("team-a") is None
    mw = MemoryDistillMiddleware.from_memory(mem, k=2)
    model = ScriptedChatModel(responses=[AIMessage(content="Done.")])
    agent = create_agent(model, [], middleware=[mw])

    def recall_prompt() -> str:
        agent.invoke({"messages": [HumanMessage("find the population of Oslo, search the web and cite")]})
        return next(m.content for m in model.seen[-1] if isinstance(m, SystemMessage))

    before = recall_prompt()
    assert "Relevant past episodes" in before and ", predicted " not in before
    report = mem.consolidate()  # e.g. the periodic worker, while the agent keeps running
    after = recall_prompt()
    assert ", predicted " in after
    assert mw.retriever.invoke("population of Oslo")[0].metadata["model_version"] == report.version


def test_recall_shows_an_episode_recorded_several_times_once(store):
    same = "User: population of Oslo?\nTool call: lookup({\"city\": \"Oslo\"})\nAnswer: 700,000"
    store.add_many([{"text": same, "reward": 1.0} for _ in range(3)]
                   + [{"text": "User: population of Oslo?\nAnswer: I think 2 million", "reward": 0.0}])
    model = ScriptedChatModel(responses=[AIMessage(content="Done.")])
    agent = create_agent(model, [], middleware=[MemoryDistillMiddleware(store, k=2, record=False)])
    agent.invoke({"messages": [HumanMessage("population of Oslo?")]})
    prompt = next(m.content for m in model.seen[-1] if isinstance(m, SystemMessage))
    assert prompt.count("\n- [reward") == 2 and prompt.count("Answer: 700,000") == 1 and "2 million" in prompt
    other = MemoryDistillMiddleware(store, k=2, record=False, namespace="empty")  # nothing recorded there yet
    create_agent(model, [], middleware=[other]).invoke({"messages": [HumanMessage("population of Oslo?")]})
    assert not any(isinstance(m, SystemMessage) and "Relevant past" in m.content for m in model.seen[-1])


def test_a_bad_reward_fn_leaves_the_episode_pending_not_the_run_failed(store, caplog):
    from memory_distill import InvalidMemoryError

    model = ScriptedChatModel(responses=[AIMessage(content="Done.")])
    for reward_fn, why in ((lambda q, a, m: 1.5, "outside the configured range"), (lambda q, a, m: 1 / 0, "ZeroDivision")):
        mw = MemoryDistillMiddleware(store, reward_fn=reward_fn, recall=False)
        out = create_agent(model, [], middleware=[mw]).invoke({"messages": [HumanMessage("grade me")]})
        assert out["messages"][-1].content == "Done." and store.get(out["memory_distill_episode_id"]).reward is None
        assert why in caplog.text
    strict = MemoryDistillMiddleware(store, reward_fn=lambda q, a, m: 1.5, recall=False, errors="raise")
    with pytest.raises(InvalidMemoryError, match="reward_fn's reward"):
        create_agent(model, [], middleware=[strict]).invoke({"messages": [HumanMessage("grade me")]})
    # a judge's True, NaN or one-element array: pending too, and never queued, where it used to fail every write
    # after it (each batch carries the waiting episodes); numpy numbers are numbers
    import numpy as np

    grades = iter([True, float("nan"), np.array([0.5]), np.float32(0.75), 0.25])
    mw = MemoryDistillMiddleware(store, reward_fn=lambda q, a, m: next(grades), recall=False)
    agent = create_agent(model, [], middleware=[mw])
    rewards = [store.get(agent.invoke({"messages": [HumanMessage(f"grade me {i}")]})["memory_distill_episode_id"]).reward
               for i in range(5)]
    assert rewards == [None, None, None, 0.75, 0.25] and not mw.unsaved
    assert "reward_fn's reward must be a number or null, got bool True" in caplog.text
    assert "reward_fn's reward must be finite, got nan" in caplog.text
    with pytest.raises(InvalidMemoryError, match="must be a finite number, got True"):  # written: the store checks
        mw.feedback(mw.episode_ids[-1], True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="episode_id must be one episode's id"):  # ("unhashable type: 'list'")
        mw.feedback(mw.episode_ids[-1:], 0.5)  # type: ignore[arg-type]
    # a judge that cannot be called as reward_fn(question, answer, messages) fails when the recorder is built,
    # not as a warning on every run with the episode left pending
    for recorder in (MemoryDistillMiddleware, EpisodeRecorder):
        with pytest.raises(TypeError, match="reward_fn must be a function .* got float 0.8"):
            recorder(store, reward_fn=0.8)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"reward_fn must take \(question, answer, messages\): too many"):
            recorder(store, reward_fn=lambda answer: 1.0)  # type: ignore[arg-type,misc]
        with pytest.raises(TypeError, match="namespace= must be a function of the run's .*: too many"):
            recorder(store, namespace=lambda: "user-1")  # type: ignore[arg-type]
        # a truthy "no" turned on what it meant to turn off; a str reward failed inside a comparison
        with pytest.raises(TypeError, match=r"background must be True or False \(grade and write off"):
            recorder(store, background="no")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="failure_reward must be a reward .* got str '0'"):
            recorder(store, failure_reward="0")  # type: ignore[arg-type]
    for flag in ("recall", "record", "handle_tool_errors", "expose_recall_tool"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False .* got str 'no'"):
            MemoryDistillMiddleware(store, **{flag: "no"})
    with pytest.raises(TypeError, match="predictor_for must be a function namespace -> Predictor"):
        MemoryDistillMiddleware(store, predictor_for=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retriever must be a ValueAwareRetriever, got str"):
        MemoryDistillMiddleware(store, retriever="recall")  # type: ignore[arg-type]
    assert MemoryDistillMiddleware(store, recall=np.bool_(False)).do_recall is False


def test_async_agent_and_late_feedback(trained_store):
    store, _, pred = trained_store
    model = ScriptedChatModel(responses=tool_then_answer("lookup", {"city": "Lima"}, "About 10 million."))
    mw = MemoryDistillMiddleware(store, pred)  # no reward_fn: the episode waits for feedback
    agent = create_agent(model, [lookup], middleware=[mw])
    out = asyncio.run(agent.ainvoke({"messages": [HumanMessage("population of Lima?")]}))
    mid = out["memory_distill_episode_id"]
    assert store.get(mid).reward is None and mw.episode_ids == [mid]
    assert any("Relevant past episodes" in m.content for m in model.seen[0] if isinstance(m, SystemMessage))
    mw.feedback(mid, 0.3)
    assert store.get(mid).reward == 0.3


@pytest.mark.parametrize("use_async", [False, True])
def test_tool_exception_is_recorded_as_failed_episode(store, use_async):
    model = ScriptedChatModel(responses=tool_then_answer("broken", {"city": "Oslo"}, "Sorry, I could not find it."))
    mw = MemoryDistillMiddleware(store, recall=False)
    agent = create_agent(model, [broken], middleware=[mw])
    inp = {"messages": [HumanMessage("population of Oslo?")]}
    out = asyncio.run(agent.ainvoke(inp)) if use_async else agent.invoke(inp)
    ep = store.get(out["memory_distill_episode_id"])
    assert ep.metadata["outcome"] == "failed" and ep.metadata["tool_errors"] == 1 and ep.reward == 0.0
    assert "Tool error (broken): Tool error: ConnectionError: upstream API down" in ep.text
    # the model saw the error as a tool message and answered
    assert out["messages"][-1].content == "Sorry, I could not find it."


def test_tool_exception_reraised_is_still_recorded(store):
    model = ScriptedChatModel(responses=tool_then_answer("broken", {"city": "Oslo"}, "unused"))
    mw = MemoryDistillMiddleware(store, recall=False, handle_tool_errors=False)
    agent = create_agent(model, [broken], middleware=[mw])
    with pytest.raises(ConnectionError):
        agent.invoke({"messages": [HumanMessage("population of Oslo?")]})
    (ep,) = store.get_many(mw.episode_ids)
    assert ep.metadata["outcome"] == "failed" and "upstream API down" in ep.text


def test_a_retriever_of_ones_own_brings_its_settings(trained_store):
    store, _, pred = trained_store
    own = ValueAwareRetriever(store=store, predictor=pred, k=2, mode="cautionary")
    assert MemoryDistillMiddleware(store, retriever=own).retriever is own
    for extra in ({"predictor": pred}, {"k": 5}, {"diversity": 0.5}):  # these used to be ignored without a word
        with pytest.raises(ValueError, match="pass retriever= or predictor= / k= / diversity=, not both"):
            MemoryDistillMiddleware(store, retriever=own, **extra)
    mem = SimpleNamespace(store=store, try_predictor=lambda ns=None: pred)
    assert MemoryDistillMiddleware.from_memory(mem, retriever=own).retriever is own


def test_recall_tool_exposed_to_the_model(trained_store):
    store, _, pred = trained_store
    model = ScriptedChatModel(responses=tool_then_answer("recall_past_episodes", {"query": "cite sources"}, "done"))
    mw = MemoryDistillMiddleware(store, pred, recall=False, record=False, expose_recall_tool=True)
    agent = create_agent(model, [], middleware=[mw])
    out = agent.invoke({"messages": [HumanMessage("what worked before?")]})
    tool_msg = [m for m in out["messages"] if m.type == "tool"][0]
    assert tool_msg.name == "recall_past_episodes" and tool_msg.content.count("\n") >= 2 and "predicted" in tool_msg.content
    # the model sees the modes as an enum in the tool's schema, so it cannot invent one
    (tool,) = mw.tools
    schema = tool.tool_call_schema.model_json_schema()["properties"]["mode"]
    assert schema["enum"] == ["likely_success", "cautionary", "similarity"] and schema["default"] == "likely_success"


@pytest.mark.parametrize("use_async", [False, True])
def test_callback_handler_records_agent_runs(store, use_async):
    model = ScriptedChatModel(responses=tool_then_answer("lookup", {"city": "Oslo"}, "700k"))
    agent = create_agent(model, [lookup])
    rec = EpisodeRecorder(store, reward_fn=lambda q, a, m: 1.0 if "700k" in a else 0.0, metadata={"agent": "prod"})
    inp = {"messages": [HumanMessage("population of Oslo?")]}
    if use_async:
        asyncio.run(agent.ainvoke(inp, config={"callbacks": [rec]}))
    else:
        agent.invoke(inp, config={"callbacks": [rec]})
    (ep,) = store.get_many(rec.episode_ids)
    assert ep.reward == 1.0 and ep.metadata["agent"] == "prod" and ep.metadata["source"] == "langchain_callback"
    assert 'Tool call: lookup({"city": "Oslo"})' in ep.text and "Answer: 700k" in ep.text
    # OpenAI-style dict messages with content parts: the question's text, not the parts' Python repr
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "population of Oslo?"}]}]}
    agent.invoke(parts, config={"callbacks": [rec]})
    again = store.get(rec.episode_ids[-1])
    assert again.text.startswith("User: population of Oslo?\n") and again.metadata["group"] == ep.metadata["group"]


def test_recorded_episodes_are_grouped_by_user_input(store):
    """Attempts at the same input share a group (train/held-out splits and the best-of-n ranking head use it)."""
    def run(question, metadata=None, callback=False):
        model = ScriptedChatModel(responses=tool_then_answer("lookup", {"city": "Oslo"}, "700k"))
        if callback:
            rec = EpisodeRecorder(store, metadata=metadata)
            create_agent(model, [lookup]).invoke({"messages": [HumanMessage(question)]}, config={"callbacks": [rec]})
            return store.get(rec.episode_ids[-1]).metadata
        mw = MemoryDistillMiddleware(store, recall=False, metadata=metadata)
        out = create_agent(model, [lookup], middleware=[mw]).invoke({"messages": [HumanMessage(question)]})
        return store.get(out["memory_distill_episode_id"]).metadata

    a, b = run("Population of Oslo?"), run("  population   of OSLO? ")
    c = run("Population of Lima?")
    assert a["group"] == b["group"] == input_group("population of oslo?") and a["group"] != c["group"]
    assert run("Population of Oslo?", callback=True)["group"] != c["group"]
    assert run("Population of Oslo?", metadata={"group": "task-7"})["group"] == "task-7"  # the user's group wins


def test_recorded_episodes_name_the_model_that_answered(store):
    """The answering model (from the provider's response_metadata) is recorded as metadata "model", so
    JobConfig(metadata_features=("model",)) can learn which model pays off; the user's metadata wins."""
    def scripted(name):
        msgs = tool_then_answer("lookup", {"city": "Oslo"}, "700k")
        return ScriptedChatModel(responses=[m.model_copy(update={"response_metadata": {"model_name": name}})
                                            for m in msgs])

    mw = MemoryDistillMiddleware(store, recall=False)
    out = create_agent(scripted("small-1"), [lookup], middleware=[mw]).invoke({"messages": [HumanMessage("Oslo?")]})
    assert store.get(out["memory_distill_episode_id"]).metadata["model"] == "small-1"
    mw = MemoryDistillMiddleware(store, recall=False, metadata={"model": "mine"})
    out = create_agent(scripted("small-1"), [lookup], middleware=[mw]).invoke({"messages": [HumanMessage("Oslo?")]})
    assert store.get(out["memory_distill_episode_id"]).metadata["model"] == "mine"
    rec = EpisodeRecorder(store)
    create_agent(scripted("large-2"), [lookup]).invoke({"messages": [HumanMessage("Oslo?")]}, config={"callbacks": [rec]})
    assert store.get(rec.episode_ids[-1]).metadata["model"] == "large-2"
    # a chain ending in a chat model (no agent state): the handler reads the model from the LLM result
    from langchain_core.runnables import RunnableLambda

    rec = EpisodeRecorder(store)
    (RunnableLambda(lambda q: q) | scripted("bare-3")).invoke("Oslo?", config={"callbacks": [rec]})
    assert store.get(rec.episode_ids[-1]).metadata["model"] == "bare-3"
    # no response_metadata: no "model" key
    rec = EpisodeRecorder(store)
    create_agent(ScriptedChatModel(responses=tool_then_answer("lookup", {"city": "Oslo"}, "700k")), [lookup]).invoke(
        {"messages": [HumanMessage("Oslo?")]}, config={"callbacks": [rec]})
    assert "model" not in store.get(rec.episode_ids[-1]).metadata


def test_callback_handler_records_failed_root_run(store):
    rec = EpisodeRecorder(store)
    from langchain_core.runnables import RunnableLambda

    def boom(x):
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        RunnableLambda(boom).invoke({"input": "hello"}, config={"callbacks": [rec]})
    (ep,) = store.get_many(rec.episode_ids)
    assert ep.metadata["outcome"] == "failed" and ep.reward == 0.0 and "Run failed: ValueError: bad input" in ep.text


def test_scorer_batches_in_one_forward_pass(trained_store):
    _, _, pred = trained_store
    scorer = RewardScorer(pred)
    calls = []
    real = pred.runner.probs
    pred.runner.probs = lambda X, F=None: calls.append(len(X)) or real(X, F)
    preds = scorer.batch([GOOD, Document(page_content=BAD), GOOD])
    assert calls == [3] and preds[0].mean == pytest.approx(preds[2].mean)
    assert preds[0].mean > preds[1].mean + 0.3
    apreds = asyncio.run(scorer.abatch([GOOD, BAD]))
    assert calls[-1] == 2 and apreds[0].mean == pytest.approx(preds[0].mean)
    assert scorer.invoke(GOOD).mean == pytest.approx(preds[0].mean)
    with pytest.raises(TypeError, match=r"got list: score several with .batch\(\[...\]\) or best_of_n"):
        scorer.invoke([GOOD, BAD])
    idx, best, _ = best_of_n([BAD, GOOD, BAD], scorer)
    assert idx == 1 and best == GOOD
    assert best_of_n([BAD, GOOD], scorer, by="lcb")[0] == 1
    assert best_of_n([BAD, GOOD], scorer, by="prob_above", threshold=0.6)[0] == 1
    for kw in ({"by": "lcb", "risk": float("nan")}, {"by": "prob_above", "threshold": float("nan")}):
        with pytest.raises(ValueError, match="must be a"):  # every key NaN: argmax picked the first candidate
            best_of_n([BAD, GOOD], scorer, **kw)


def test_scorer_batch_reports_each_input_to_callbacks(trained_store):
    """batch/abatch ran one forward pass but skipped the config: no callback saw the runs, and
    return_exceptions=True still raised on one bad input instead of scoring the rest."""
    from langchain_core.callbacks import BaseCallbackHandler

    _, _, pred = trained_store
    scorer = RewardScorer(pred)

    class Seen(BaseCallbackHandler):
        def __init__(self):
            self.starts, self.ends, self.errors = [], [], []

        def on_chain_start(self, serialized, inputs, **kw):
            self.starts.append((kw.get("name"), inputs))

        def on_chain_end(self, outputs, **kw):
            self.ends.append(outputs)

        def on_chain_error(self, error, **kw):
            self.errors.append(error)

    seen = Seen()
    preds = scorer.batch([GOOD, BAD], config={"callbacks": [seen], "run_name": "judge"})
    assert seen.starts == [("judge", GOOD), ("judge", BAD)]
    assert [o.mean for o in seen.ends] == [p.mean for p in preds] and not seen.errors
    seen2 = Seen()
    asyncio.run(scorer.abatch([GOOD], config=[{"callbacks": [seen2]}]))
    assert len(seen2.starts) == 1 and len(seen2.ends) == 1

    calls = []
    real = pred.runner.probs
    pred.runner.probs = lambda X, F=None: calls.append(len(X)) or real(X, F)
    mixed = scorer.batch([GOOD, 42, BAD], return_exceptions=True)
    assert calls == [2] and isinstance(mixed[1], TypeError)
    assert mixed[0].mean == pytest.approx(preds[0].mean) and mixed[2].mean == pytest.approx(preds[1].mean)
    mixed = asyncio.run(scorer.abatch([42, GOOD], return_exceptions=True))
    assert isinstance(mixed[0], TypeError) and mixed[1].mean == pytest.approx(preds[0].mean)
    with pytest.raises(TypeError, match="got int"):
        scorer.batch([GOOD, 42])
    with pytest.raises(TypeError, match="take a list of inputs, got one str"):
        scorer.batch(GOOD)
    with pytest.raises(TypeError, match="auto_refresh must be True or False"):
        RewardScorer(pred, auto_refresh="no")  # type: ignore[arg-type]


def test_retriever_modes_rank_by_value(trained_store):
    store, _, pred = trained_store
    r = ValueAwareRetriever(store=store, predictor=pred, k=5, fetch_k=40)
    q = "Task: find the population of Oslo in 2020."
    good = r.invoke(q)
    bad = r.invoke(q, mode="cautionary")
    assert np.mean([d.metadata["predicted_mean"] for d in good]) > np.mean([d.metadata["predicted_mean"] for d in bad]) + 0.3
    d = good[0].metadata
    assert {"id", "reward", "predicted_mean", "predicted_std", "similarity", "score", "model_version"} <= set(d)
    assert len(r.invoke(q, k=2)) == 2
    only = r.invoke(q, where={"strategy": 0})
    assert only and all(x.metadata["strategy"] == 0 for x in only)
    sim = r.invoke(q, mode="similarity")
    assert [x.metadata["similarity"] for x in sim] == sorted([x.metadata["similarity"] for x in sim], reverse=True)
    with pytest.raises(ValueError, match="mode must be"):
        r.invoke(q, mode="nope")
    with pytest.raises(ValueError, match="k must be >= 1, got -1"):  # (a negative k used to slice off the last one)
        r.invoke(q, k=-1)
    # a misspelt option or a negative weight is an error, not silently the default
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="weights\n  Extra inputs are not permitted"):
        ValueAwareRetriever(store=store, predictor=pred, weights=(0.5, 0.5))
    with pytest.raises(ValidationError, match="w_value\n  Input should be greater than or equal to 0"):
        ValueAwareRetriever(store=store, predictor=pred, w_value=-0.3)
    with pytest.raises(ValidationError, match="w_value\n  Input should be a finite number"):  # inf * 0 ranked by NaN
        ValueAwareRetriever(store=store, predictor=pred, w_value=float("inf"))
    with pytest.raises(ValidationError, match="diversity\n  Input should be a finite number"):  # not at first recall
        ValueAwareRetriever(store=store, predictor=pred, diversity=float("inf"))
    with pytest.raises(ValidationError, match="are all 0, so nothing ranks the candidates"):  # an arbitrary order
        ValueAwareRetriever(store=store, predictor=pred, w_similarity=0, w_value=0, w_recency=0)


def test_retriever_without_a_model_uses_stored_rewards(store):
    store.add_many([{"text": "plan A for the report", "reward": 0.9}, {"text": "plan A for the report!", "reward": 0.1}])
    r = ValueAwareRetriever(store=store, k=2)
    assert [d.metadata["reward"] for d in r.invoke("plan A for the report")] == [0.9, 0.1]
    assert [d.metadata["reward"] for d in r.invoke("plan A for the report", mode="cautionary")] == [0.1, 0.9]
    # a misspelt per-call option used to be ignored: namepsace="user-2" searched the retriever's own namespace
    store.add_many([{"text": "plan A for the report, user 2", "reward": 0.5}], namespace="user-2")
    with pytest.raises(ValueError, match="unknown retriever option 'namepsace': did you mean 'namespace'"):
        r.invoke("plan A for the report", namepsace="user-2")
    assert [d.metadata["reward"] for d in r.invoke("plan A for the report", namespace="user-2")] == [0.5]
    assert len(r.invoke("plan A for the report", k=None, mode=None)) == 2  # None: the retriever's own setting
    with pytest.raises(TypeError, match="k must be an int .* got float 1.9"):  # int(1.9) quietly returned 1
        r.invoke("plan A for the report", k=1.9)
    from memory_distill import StoreError

    with pytest.raises(StoreError, match=r"\$contains tests a list's elements"):  # when built, not at first recall
        ValueAwareRetriever(store=store, where={"tool": {"$contains": "sea"}})
    for recorder in (MemoryDistillMiddleware, EpisodeRecorder):  # not "dictionary update sequence element #0"
        with pytest.raises(TypeError, match="metadata= must be a dict recorded with every episode"):
            recorder(store, metadata="planner-v2")  # type: ignore[arg-type]


def test_stored_rewards_rank_in_an_unbounded_reward_range(tmp_path):
    """StoreConfig(reward_min=-inf, reward_max=inf) accepts any reward; scaled by that range every value was
    inf / inf = NaN, and the order arbitrary. The candidates' own range scales them instead."""
    from memory_distill import HashingEmbedder, MemoryStore, StoreConfig

    st = MemoryStore(HashingEmbedder(dim=64), StoreConfig(path=tmp_path / "s", reward_min=float("-inf"),
                                                          reward_max=float("inf")))
    st.add_many([{"text": "plan A for the report", "reward": 900}, {"text": "plan A for the report!", "reward": -50},
                 {"text": "plan A for the report?"}])
    r = ValueAwareRetriever(store=st, k=3, w_similarity=0.1, w_value=1.0, w_recency=0.0)
    assert [d.metadata.get("reward") for d in r.invoke("plan A for the report")] == [900, None, -50]
    assert [d.metadata.get("reward") for d in r.invoke("plan A for the report", mode="cautionary")] == [-50, None, 900]


def test_retriever_diversity_keeps_near_copies_from_filling_the_results(store):
    retry = "Task: book a flight to Lisbon. The agent searched fares, compared three airlines and booked the cheapest"
    store.add_many([{"text": f"{retry} (attempt {i})", "reward": 0.9} for i in range(5)]
                   + [{"text": "Task: book a flight to Lisbon by train and ferry instead, comparing total travel time",
                       "reward": 0.8},
                      {"text": "Task: book a hotel in Lisbon near the airport after checking reviews", "reward": 0.8}])
    r = ValueAwareRetriever(store=store, k=3, fetch_k=10)
    q = "book a flight to Lisbon"
    plain = [d.page_content for d in r.invoke(q)]
    assert all(t.startswith(retry) for t in plain)  # three copies of one episode
    diverse = r.invoke(q, diversity=0.8)
    texts = [d.page_content for d in diverse]
    assert texts[0] == plain[0] and sum(t.startswith(retry) for t in texts) == 1 and len(set(texts)) == 3
    assert r.invoke(q, diversity=0.0) and [d.page_content for d in r.invoke(q, diversity=0.0)] == plain
    with pytest.raises(ValueError, match="diversity must be"):
        r.invoke(q, diversity=-1)


def test_predict_tool(trained_store):
    from memory_distill import forget

    store, registry, pred = trained_store
    for bad in ("estimate payoff", "", "x" * 65, None):  # built fine, then refused by the provider at the first call
        with pytest.raises(ValueError, match="is not one chat models take: use 1-64 letters, digits, _ or -"):
            make_predict_tool(pred, name=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'recall past' is not one chat models take"):
        make_recall_tool(ValueAwareRetriever(store=store), name="recall past")
    assert make_predict_tool(pred, name="estimate-payoff_2").name == "estimate-payoff_2"
    tool = make_predict_tool(pred)
    out = tool.invoke({"plan": GOOD})
    assert out.startswith("expected reward 0.") and "model v000001" in out
    forget(store, registry, namespace="default")  # everything: the model is retired
    assert tool.invoke({"plan": GOOD}).startswith("no model has learned from past episodes here yet")


def test_grading_helpers():
    from langchain_memory_distill import bleu, exact_match, token_f1

    from memory_distill import HashingEmbedder

    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert token_f1("Seth MacFarlane created it", "Seth MacFarlane") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert 0 < bleu("the cat sat on the red mat", "the cat sat on the mat") < 1
    assert AnswerGrader("exact_match")("Paris", "paris") == 1.0
    assert AnswerGrader("token_f1", threshold=0.8)("Seth MacFarlane created it", "Seth MacFarlane") == 0.0
    assert AnswerGrader("token_f1", continuous=True)("x y", "x y z") == pytest.approx(0.8)
    g = AnswerGrader("embedding", embedder=HashingEmbedder(dim=256), threshold=0.8)
    assert g("the agent searched the web", "the agent searched the web") == 1.0 and g("banana", "quantum physics") == 0.0
    with pytest.raises(ValueError, match="needs embedder"):
        AnswerGrader("embedding")
    # several acceptable answers: the best score counts (a list failed as "'list' object has no attribute 'lower'")
    assert AnswerGrader("exact_match")("Lima", ["Lima, Peru", "lima"]) == 1.0
    assert AnswerGrader("token_f1", continuous=True)("x y", ["q", "x y z"]) == pytest.approx(0.8)
    for bad in (float("nan"), 2):  # every answer graded 0
        with pytest.raises(ValueError, match=r"threshold must be a score in \[0, 1\]"):
            AnswerGrader("token_f1", threshold=bad)
    assert AnswerGrader("token_f1", threshold=np.float32(0.5))("Lima", "Lima") == 1.0  # a numpy threshold too
    with pytest.raises(TypeError, match="continuous must be True or False"):  # ("no" returned scores)
        AnswerGrader("token_f1", continuous="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got the str 'hashing'"):  # (failed at the first grade)
        AnswerGrader("embedding", embedder="hashing")
    with pytest.raises(TypeError, match="answer must be a str, got NoneType"):
        AnswerGrader()(None, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reference must be a str or a non-empty list of str"):
        AnswerGrader()("x", [])


def test_router_routes_by_predicted_reward(trained_store):
    _, _, pred = trained_store
    cheap = ScriptedChatModel(responses=[AIMessage(content="cheap answer")])
    strong = ScriptedChatModel(responses=[AIMessage(content="strong answer")])
    router = RewardRouter(cheap, strong, pred, threshold=0.5)
    a = router.invoke(GOOD)
    b = asyncio.run(router.ainvoke([HumanMessage(BAD)]))
    assert a.content == "cheap answer" and a.response_metadata["memory_distill_route"]["model"] == "cheap"
    assert b.content == "strong answer" and b.response_metadata["memory_distill_route"]["predicted_reward"] < 0.5
    assert router.stats.cheap == 1 and router.stats.strong == 1
    assert router.cost_saved() == pytest.approx(1 - (1 + 10) / 20)
    with pytest.raises(ValueError, match=r"threshold 3 is outside the rewards the student predicts \(\[-?0.0"):
        RewardRouter(cheap, strong, pred, threshold=3)
    with pytest.raises(TypeError, match="RewardRouter needs a Predictor .*got NoneType"):  # not 'no attribute bins'
        RewardRouter(cheap, strong, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cheap must be a chat model .* got str: build the model, e.g. "
                                        r"init_chat_model\('gpt-4o-mini'\)"):  # (failed at the first question)
        RewardRouter("gpt-4o-mini", strong, pred)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cost_strong must be a price > 0"):  # cost_saved() divided by zero
        RewardRouter(cheap, strong, pred, cost_strong=0)
    with pytest.raises(TypeError, match="threshold must be a reward .* got str '0.5'"):  # not "'<=' not supported"
        RewardRouter(cheap, strong, pred, threshold="0.5")  # type: ignore[arg-type]
    # the other message forms chat models take are routed on their user message (they were routed on the list's repr)
    for messages in ([("system", "be brief"), ("user", GOOD)], [{"role": "user", "content": GOOD}]):
        out = router.invoke(messages)
        assert out.response_metadata["memory_distill_route"]["predicted_reward"] == pytest.approx(router.route(GOOD)[1])
    with pytest.raises(ValueError, match="routes on the last user message, and this list has none"):
        router.invoke([("system", "be brief")])


def test_a_router_without_a_prediction_goes_to_the_strong_model(trained_store, caplog):
    """Routing never takes the agent down, nor trades quality for cost blind: when no prediction can be made (here
    the model was retired: forget emptied the store), questions go to the strong model, logged once."""
    from memory_distill import forget

    store, registry, pred = trained_store
    router = RewardRouter(ScriptedChatModel(responses=[AIMessage(content="cheap")]),
                          ScriptedChatModel(responses=[AIMessage(content="strong")]), pred, threshold=0.5)
    assert router.invoke(GOOD).content == "cheap"
    assert forget(store, registry, namespace="default")["retired"] == ["(top level)"]
    for q in (GOOD, GOOD):
        out = router.invoke(q)
        assert out.content == "strong" and out.response_metadata["memory_distill_route"]["predicted_reward"] is None
    assert router.stats.unpredicted == 2 and router.stats.strong == 2 and len(router.stats.predicted) == 1
    assert caplog.text.count("routing to the strong model: no prediction (NoModelError") == 1


def test_a_long_running_router_keeps_the_latest_predictions(trained_store, monkeypatch):
    import langchain_memory_distill.router as router_mod

    _, _, pred = trained_store
    monkeypatch.setattr(router_mod, "RECENT_PREDICTIONS", 3)
    router = RewardRouter(ScriptedChatModel(responses=[AIMessage(content="a")]),
                          ScriptedChatModel(responses=[AIMessage(content="b")]), pred)
    for q in (GOOD, BAD, GOOD, BAD, GOOD):
        router.invoke(q)
    assert router.stats.cheap + router.stats.strong == 5 and len(router.stats.predicted) == 3
    assert list(router.stats.predicted) == [router.route(q)[1] for q in (GOOD, BAD, GOOD)]


def test_routing_curve():
    from memory_distill.routing import routing_curve

    p = np.array([0.9, 0.8, 0.2, 0.1])
    cheap, strong = np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0, 1.0])
    pts = {round(pt.threshold, 2): pt for pt in routing_curve(p, cheap, strong, thresholds=np.array([0.5, 2.0]))}
    assert pts[0.5].cheap_fraction == 0.5 and pts[0.5].quality == 1.0 and pts[0.5].cost_saved == pytest.approx(0.45)
    assert pts[2.0].cheap_fraction == 0.0 and pts[2.0].cost_saved == 0.0


def _gate_writes(store):
    """Hold the store's writes until the returned event is set (the store itself stays real)."""
    import threading

    gate, real = threading.Event(), store.add_many

    def gated(*a, **kw):
        assert gate.wait(10), "write not released"
        return real(*a, **kw)

    store.add_many = gated
    return gate


def test_background_recording_returns_before_the_write_and_grading(store):
    """background=True: the run returns with its id while the judge and the write are still pending; a late
    feedback wins over the judge; flush() waits for both; episodes queued meanwhile go out in one batch."""
    import threading

    judged = threading.Event()

    def judge(question, answer, messages):  # a slow LLM judge
        assert judged.wait(10)
        return 0.9

    gate = _gate_writes(store)
    model = ScriptedChatModel(responses=[AIMessage(content="Done.")])
    mw = MemoryDistillMiddleware(store, reward_fn=judge, recall=False, background=True)
    agent = create_agent(model, [], middleware=[mw])
    first = agent.invoke({"messages": [HumanMessage("task one")]})["memory_distill_episode_id"]
    second = agent.invoke({"messages": [HumanMessage("task two")]})["memory_distill_episode_id"]
    assert store.count() == 0 and mw.episode_ids == [first, second]  # nothing written, nobody waited
    mw.feedback(first, 0.2)  # a human's rating arrives while the judge still runs: it wins
    judged.set()
    gate.set()
    mw.flush()
    assert mw.unsaved == {}
    assert store.get(first).reward == 0.2 and store.get(second).reward == 0.9
    assert store.get(second).text.startswith("User: task two")
    mw.close()


def test_background_feedback_while_the_write_is_in_flight_is_not_lost(store):
    import threading

    started = threading.Event()
    gate, real = threading.Event(), store.add_many

    def slow(*a, **kw):
        started.set()
        assert gate.wait(10)
        return real(*a, **kw)

    store.add_many = slow
    rec = EpisodeRecorder(store, background=True)
    model = ScriptedChatModel(responses=[AIMessage(content="Done.")])
    create_agent(model, []).invoke({"messages": [HumanMessage("task")]}, config={"callbacks": [rec]})
    (mid,) = rec.episode_ids
    assert started.wait(10)  # the batch (reward pending) is being written
    rec.feedback(mid, 0.7)  # lands on the waiting copy, which is rewritten after the batch
    gate.set()
    rec.flush()
    assert store.get(mid).reward == 0.7 and rec.unsaved == {}
    rec.close()


def test_background_batches_episodes_that_queue_up(store):
    gate = _gate_writes(store)
    batches = []
    gated = store.add_many

    def counting(mems, **kw):
        mems = list(mems)
        batches.append(len(mems))
        return gated(mems, **kw)

    store.add_many = counting
    model = ScriptedChatModel(responses=[AIMessage(content="Done.")])
    mw = MemoryDistillMiddleware(store, recall=False, background=True)
    agent = create_agent(model, [], middleware=[mw])
    ids = [agent.invoke({"messages": [HumanMessage(f"task {i}")]})["memory_distill_episode_id"] for i in range(5)]
    gate.set()
    mw.flush()
    assert sum(batches) == 5 and len(batches) <= 2  # the first at once, those queued behind it together
    assert [m.id for m in store.get_many(ids)] == ids
    mw.close()


EXITS_RIGHT_AFTER = """
import sys, time
sys.path.insert(0, {tests!r})
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage
from langchain_memory_distill import MemoryDistillMiddleware
from lc_helpers import ScriptedChatModel
from memory_distill import HashingEmbedder, MemoryStore, StoreConfig

def judge(q, a, m):
    time.sleep(0.5)  # a slow judge, still grading when the script ends
    return 0.6

st = MemoryStore(HashingEmbedder(dim={dim}), StoreConfig(path={path!r}))
mw = MemoryDistillMiddleware(st, reward_fn=judge, recall=False, background=True)
agent = create_agent(ScriptedChatModel(responses=[AIMessage(content="Done.")]), [], middleware=[mw])
for q in ("first task", "second task"):
    print(agent.invoke({{"messages": [HumanMessage(q)]}})["memory_distill_episode_id"], flush=True)
"""


def test_background_episodes_are_written_when_the_process_exits(store, tmp_path):
    """A script that records with background=True and ends at once (no flush, no close) loses nothing."""
    import os
    import subprocess
    import sys

    script = EXITS_RIGHT_AFTER.format(tests=os.path.dirname(__file__), dim=store.embedder.dim,
                                      path=str(tmp_path / "chroma"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ids = out.stdout.split()
    assert len(ids) == 2
    fresh = type(store)(store.embedder, store.config)
    assert [(m.id, m.reward) for m in fresh.get_many(ids)] == [(ids[0], 0.6), (ids[1], 0.6)]


def test_bad_recorder_settings_fail_at_construction_naming_the_field(store):
    from memory_distill import InvalidMemoryError

    for make in (MemoryDistillMiddleware, EpisodeRecorder):
        with pytest.raises(InvalidMemoryError, match=r"metadata\['tags'\] must be a str.*json.dumps"):
            make(store, metadata={"tags": ["a", "b"]})
        with pytest.raises(InvalidMemoryError, match="failure_reward"):
            make(store, failure_reward=5.0)


@pytest.mark.parametrize("background", [False, True])
def test_an_invalid_episode_is_dropped_and_never_holds_back_the_next(store, caplog, background):
    """An episode Chroma cannot hold is refused before it is queued: the run goes on, later episodes are written."""
    from memory_distill import InvalidMemoryError

    model = ScriptedChatModel(responses=[AIMessage(content="Done.")])
    mw = MemoryDistillMiddleware(store, recall=False, background=background)
    agent = create_agent(model, [], middleware=[mw])
    mw.metadata["tags"] = ["changed", "after", "construction"]  # now invalid for Chroma
    out = agent.invoke({"messages": [HumanMessage("first")]})
    assert out["messages"][-1].content == "Done." and "memory_distill_episode_id" not in out
    assert "episode dropped" in caplog.text and mw.unsaved == {}
    del mw.metadata["tags"]
    ok = agent.invoke({"messages": [HumanMessage("second")]})["memory_distill_episode_id"]
    mw.flush()
    assert store.count() == 1 and store.get(ok).text.startswith("User: second") and mw.episode_ids == [ok]
    strict = MemoryDistillMiddleware(store, recall=False, errors="raise")
    strict.metadata["tags"] = ["x"]
    with pytest.raises(InvalidMemoryError, match="tags"):
        create_agent(model, [], middleware=[strict]).invoke({"messages": [HumanMessage("third")]})
    mw.close()


def test_best_of_n_with_question_scores_candidates_as_recorded_episodes(trained_store, store):
    """question= scores each answer in the shape the middleware records (train and serve see the same text)."""
    from langchain_memory_distill import episode_text

    _, _, pred = trained_store
    scorer = RewardScorer(pred)
    q = "find the population of Oslo in 2020"
    answers = ["I guessed it without checking.", Document(page_content="Searched the web, cross-checked two sources "
                                                                         "and cited them.", metadata={"agent": "a1"})]
    idx, best, preds = best_of_n(answers, scorer, question=q)
    assert idx == 1 and best is answers[1]
    want = scorer.batch([episode_text(q, answers[0]), episode_text(q, answers[1].page_content)])
    assert [p.mean for p in preds] == pytest.approx([p.mean for p in want])
    assert [p.mean for p in preds] != pytest.approx([p.mean for p in scorer.batch(answers)])  # not the bare answers
    # the scorer takes question= too (it used to swallow it in **kwargs and score the bare answer)
    assert scorer.invoke(answers[0], question=q).mean == pytest.approx(preds[0].mean)
    assert [p.mean for p in scorer.batch(answers, question=q)] == pytest.approx([p.mean for p in preds])
    assert asyncio.run(scorer.ainvoke(answers[0], question=q)).mean == pytest.approx(preds[0].mean)
    # a misspelt option was swallowed by **kwargs, and the answer scored without its question
    for call in (lambda: scorer.invoke(answers[0], questoin=q), lambda: scorer.batch(answers, questoin=q),
                 lambda: asyncio.run(scorer.abatch(answers, questoin=q))):
        with pytest.raises(TypeError, match="unknown RewardScorer option 'questoin': did you mean 'question'"):
            call()
    assert scorer.bind(question=q).invoke(answers[0]).mean == pytest.approx(preds[0].mean)  # bound: still works
    # exactly the text an agent run records
    model = ScriptedChatModel(responses=[AIMessage(content="I guessed it without checking.")])
    mw = MemoryDistillMiddleware(store, recall=False)
    mid = create_agent(model, [], middleware=[mw]).invoke({"messages": [HumanMessage(q)]})["memory_distill_episode_id"]
    assert store.get(mid).text == episode_text(q, "I guessed it without checking.")
    with pytest.raises(ValueError, match="question= or a scorer template"):
        best_of_n(answers, RewardScorer(pred, template="Q: x\nA: {text}"), question=q)
    # a template without {text} scored every candidate as the same text; another field failed later as a KeyError
    with pytest.raises(ValueError, match="has no {text} field: every candidate would be scored as the same text"):
        RewardScorer(pred, template="Task: plan the trip")
    with pytest.raises(ValueError, match=r"fields other than {text}: \['task'\]; fill them in first"):
        RewardScorer(pred, template="Task: {task}\nAnswer: {text}")
    assert RewardScorer(pred, template='JSON {{"a": 1}} {text}').invoke("x").mean == pytest.approx(
        scorer.invoke('JSON {"a": 1} x').mean)


def test_background_grading_backlog_is_bounded_and_never_blocks_writes(store, caplog):
    """A hung judge holds at most max_unsaved episodes; later ones are stored pending, and written while the
    judge still hangs (grading and writing run on separate threads)."""
    import threading
    import time

    release = threading.Event()
    mw = MemoryDistillMiddleware(store, recall=False, background=True, max_unsaved=3,
                                 reward_fn=lambda q, a, m: 1.0 if release.wait(10) else 0.0)
    agent = create_agent(ScriptedChatModel(responses=[AIMessage(content="Done.")]), [], middleware=[mw])
    ids = [agent.invoke({"messages": [HumanMessage(f"task {i}")]})["memory_distill_episode_id"] for i in range(4)]
    assert "await grading" in caplog.text and len(mw.writer._grading) <= 3
    deadline = time.time() + 10
    while store.count() < 1 and time.time() < deadline:  # the 4th, ungraded, goes out while the judge hangs
        time.sleep(0.05)
    assert [m.id for m in store.get_many(ids)] == [ids[3]] and store.get(ids[3]).reward is None
    release.set()
    mw.flush()
    assert [m.reward for m in store.get_many(ids)] == [1.0, 1.0, 1.0, None]
    mw.close()


def test_background_errors_raise_from_the_next_run_or_flush_with_errors_raise(store):
    """errors="raise" with background=True: what the threads hit (a failed write, a judge that raised) is raised
    once, by the next recorded run or flush(); episodes are kept (the error carries the queued run's
    episode_id), and a write error is forgotten once writes get through again."""
    import threading

    from memory_distill import StoreError

    real, tried, down = store.add_many, threading.Event(), [True]

    def outage(*a, **kw):
        if down[0]:
            tried.set()
            raise StoreError("Chroma server at http://127.0.0.1:9 is unreachable")
        return real(*a, **kw)

    store.add_many = outage
    model = ScriptedChatModel(responses=[AIMessage(content="Done.")])
    mw = MemoryDistillMiddleware(store, recall=False, background=True, errors="raise")
    agent = create_agent(model, [], middleware=[mw])
    first = agent.invoke({"messages": [HumanMessage("task one")]})["memory_distill_episode_id"]
    assert tried.wait(10)
    mw.writer._drain()  # the writer thread has failed and logged it
    with pytest.raises(StoreError, match="unreachable") as raised:
        agent.invoke({"messages": [HumanMessage("task two")]})
    mw.writer._drain()
    second = raised.value.episode_id  # the run's episode was queued before the raise: the error carries its id
    assert len(mw.unsaved) == 2 and list(mw.unsaved) == [first, second]  # both kept
    assert mw.episode_ids == [first, second] and mw.unsaved[second]["text"].startswith("User: task two")
    mw.feedback(second, 0.7)  # a late reward reaches it by that id
    with pytest.raises(StoreError, match="unreachable"):  # flush says so too, and the caller has now heard
        mw.flush()
    down[0] = False
    third = agent.invoke({"messages": [HumanMessage("task three")]})["memory_distill_episode_id"]  # no stale raise
    assert mw.flush() == 0 and mw.unsaved == {} and store.get(first) is not None and store.get(third) is not None
    assert store.get(second).reward == 0.7
    # without background the write fails on the caller's path: the same id on the error, the episode kept
    down[0] = True
    sync = MemoryDistillMiddleware(store, recall=False, errors="raise")
    with pytest.raises(StoreError, match="unreachable") as raised:
        create_agent(model, [], middleware=[sync]).invoke({"messages": [HumanMessage("task six")]})
    assert list(sync.unsaved) == sync.episode_ids == [raised.value.episode_id]
    down[0] = False
    assert sync.flush() == 1 and store.get(raised.value.episode_id).text.startswith("User: task six")

    returned = threading.Event()

    def judge(q, a, m):
        assert returned.wait(10)  # the run has returned: its error can only reach the next call
        raise ValueError("the judge's API key expired")

    strict = MemoryDistillMiddleware(store, reward_fn=judge, recall=False, background=True, errors="raise")
    agent = create_agent(model, [], middleware=[strict])
    pending = agent.invoke({"messages": [HumanMessage("task four")]})["memory_distill_episode_id"]
    returned.set()
    with pytest.raises(ValueError, match="API key expired"):
        strict.flush()
    assert store.get(pending).reward is None  # written, pending
    assert strict.flush() == 0  # raised once
    # errors="warn" (the default) only logs
    lenient = MemoryDistillMiddleware(store, reward_fn=judge, recall=False, background=True)
    create_agent(model, [], middleware=[lenient]).invoke({"messages": [HumanMessage("task five")]})
    assert lenient.flush() == 0
    for m in (mw, strict, lenient, sync):
        m.close()


def test_streamed_runs_are_recorded_and_their_episode_id_is_streamed(store):
    """stream / astream (any stream_mode) record the run like invoke; the id arrives in the after_agent update."""
    mw = MemoryDistillMiddleware(store, reward_fn=lambda q, a, m: 1.0, recall=False)
    agent = create_agent(ScriptedChatModel(responses=[AIMessage(content="Done.")]), [], middleware=[mw])
    updates = list(agent.stream({"messages": [HumanMessage("streamed task")]}, stream_mode="updates"))
    streamed = updates[-1]["MemoryDistillMiddleware.after_agent"]["memory_distill_episode_id"]
    list(agent.stream({"messages": [HumanMessage("streamed tokens")]}, stream_mode="messages"))

    async def astream() -> list:
        return [c async for c in agent.astream({"messages": [HumanMessage("async streamed")]}, stream_mode="values")]

    values = asyncio.run(astream())
    assert len(mw.episode_ids) == 3 and mw.episode_ids[0] == streamed
    assert values[-1]["memory_distill_episode_id"] == mw.episode_ids[2]
    got = store.get_many(mw.episode_ids)
    assert [m.text.splitlines()[0] for m in got] == ["User: streamed task", "User: streamed tokens",
                                                      "User: async streamed"]
    assert all(m.reward == 1.0 for m in got)


def test_callback_handler_with_errors_raise_raises_to_the_caller(store):
    """LangChain only logs a callback handler's exception unless the handler asks otherwise: EpisodeRecorder with
    errors="raise" does, so a failed write reaches invoke/ainvoke (carrying the kept episode's id)."""
    from memory_distill import StoreError

    real, down = store.add_many, [True]

    def outage(*a, **kw):
        if down[0]:
            raise StoreError("Chroma server at http://127.0.0.1:9 is unreachable")
        return real(*a, **kw)

    store.add_many = outage
    agent = create_agent(ScriptedChatModel(responses=[AIMessage(content="Done.")]), [])
    strict = EpisodeRecorder(store, errors="raise")
    with pytest.raises(StoreError, match="unreachable") as raised:
        agent.invoke({"messages": [HumanMessage("task one")]}, config={"callbacks": [strict]})
    with pytest.raises(StoreError, match="unreachable") as araised:
        asyncio.run(agent.ainvoke({"messages": [HumanMessage("task two")]}, config={"callbacks": [strict]}))
    ids = [raised.value.episode_id, araised.value.episode_id]
    assert strict.episode_ids == ids and list(strict.unsaved) == ids  # kept
    lenient = EpisodeRecorder(store)  # errors="warn": the run goes on, the episode waits
    agent.invoke({"messages": [HumanMessage("task three")]}, config={"callbacks": [lenient]})
    assert len(lenient.unsaved) == 1
    down[0] = False
    assert strict.flush() == 2 and lenient.flush() == 1
    assert [m.text.splitlines()[0] for m in store.get_many(ids)] == ["User: task one", "User: task two"]


def test_conversations_with_a_checkpointer_record_each_turn_with_its_thread(store):
    """With a checkpointer each turn is one episode (its own question and answer, not the whole thread), tagged
    with the conversation's thread_id; recall skips the conversation's own earlier turns (already in its messages)
    and brings back other conversations'."""
    from langgraph.checkpoint.memory import InMemorySaver

    mw = MemoryDistillMiddleware(store, k=3)
    model = ScriptedChatModel(responses=[AIMessage(content="Oslo has 700k people."), AIMessage(content="Bergen: 290k.")])
    agent = create_agent(model, [], middleware=[mw], checkpointer=InMemorySaver())
    one = {"configurable": {"thread_id": "conv-1"}}
    agent.invoke({"messages": [HumanMessage("population of Oslo?")]}, one)
    agent.invoke({"messages": [HumanMessage("population of Oslo and Bergen?")]}, one)
    assert not any(isinstance(m, SystemMessage) for m in model.seen[-1])  # turn 1 is in the messages, not recalled
    first, second = store.get_many(mw.episode_ids)
    assert first.text == "User: population of Oslo?\nAnswer: Oslo has 700k people."
    assert second.text == "User: population of Oslo and Bergen?\nAnswer: Bergen: 290k."
    assert first.metadata["thread_id"] == second.metadata["thread_id"] == "conv-1"

    out = asyncio.run(agent.ainvoke({"messages": [HumanMessage("population of Oslo?")]},
                                    {"configurable": {"thread_id": "conv-2"}}))
    system = next(m for m in model.seen[-1] if isinstance(m, SystemMessage))
    assert "Oslo has 700k people." in system.content  # another conversation's episode is recalled
    assert store.get(out["memory_distill_episode_id"]).metadata["thread_id"] == "conv-2"
    mine = MemoryDistillMiddleware(store, recall=False, metadata={"thread_id": "mine"})  # metadata= wins
    out = create_agent(model, [], middleware=[mine], checkpointer=InMemorySaver()).invoke(
        {"messages": [HumanMessage("hi")]}, one)
    assert store.get(out["memory_distill_episode_id"]).metadata["thread_id"] == "mine"
    out = create_agent(model, [], middleware=[MemoryDistillMiddleware(store, recall=False)]).invoke(
        {"messages": [HumanMessage("no checkpointer")]})
    assert "thread_id" not in store.get(out["memory_distill_episode_id"]).metadata
    # the callback handler reads the thread from the run's metadata
    rec = EpisodeRecorder(store)
    agent.invoke({"messages": [HumanMessage("and Trondheim?")]}, {**one, "callbacks": [rec]})
    assert store.get(rec.episode_ids[-1]).metadata["thread_id"] == "conv-1"
    assert store.get(rec.episode_ids[-1]).text.startswith("User: and Trondheim?\n")


def test_long_running_recorders_hold_bounded_state(store, monkeypatch):
    """A server records millions of runs: the callback handler forgets every run under a root run when it ends
    (model and tool runs two levels down included), and episode_ids keeps the latest RECENT_IDS."""
    import langchain_memory_distill.episodes as episodes

    rec = EpisodeRecorder(store)
    agent = create_agent(ScriptedChatModel(responses=tool_then_answer("lookup", {"city": "Oslo"}, "700k")), [lookup])
    for i in range(3):
        agent.invoke({"messages": [HumanMessage(f"population {i}?")]}, config={"callbacks": [rec]})
    assert len(rec.episode_ids) == 3 and rec._runs == {} and rec._parent == {} and rec._members == {}
    asyncio.run(agent.ainvoke({"messages": [HumanMessage("async?")]}, config={"callbacks": [rec]}))
    assert len(rec.episode_ids) == 4 and rec._parent == {} and rec._members == {}
    assert "Tool call: lookup" in store.get(rec.episode_ids[-1]).text  # what it tracked still reached the episode

    monkeypatch.setattr(episodes, "RECENT_IDS", 3)
    mw = MemoryDistillMiddleware(store, recall=False)
    bare = create_agent(ScriptedChatModel(responses=[AIMessage(content="Done.")]), [], middleware=[mw])
    ids = [bare.invoke({"messages": [HumanMessage(f"task {i}")]})["memory_distill_episode_id"] for i in range(5)]
    assert mw.episode_ids == ids[-3:] and store.count() == 9  # all written, the latest ids kept


def test_one_agent_serves_many_users_each_in_their_own_namespace(tmp_path, caplog):
    """namespace= a function of the run's runtime: one agent records each user's episodes in the user's own
    namespace, recalls only from it (middleware and recall tool) and scores it with the model serving it."""
    from dataclasses import dataclass

    from memory_distill import (
        ArtifactRegistry,
        HashingEmbedder,
        InvalidMemoryError,
        MemoryDistill,
        MemoryStore,
    )
    from memory_distill import StoreConfig as SC

    @dataclass
    class Ctx:
        user_id: str

    mem = MemoryDistill(MemoryStore(HashingEmbedder(dim=128), SC(path=tmp_path / "chroma")),
                        ArtifactRegistry(tmp_path / "models"), fast_job())
    eps = synthetic_episodes(300, seed=5)
    mem.add_many([{**e, "namespace": "user-alice"} for e in eps])
    mem.consolidate(namespace="user-alice")  # alice has a model of her own; bob has none, nor is there a top-level one
    mem.add_many([{"text": "Task: bob's spreadsheet. The agent asked bob.", "reward": 0.3, "namespace": "user-bob"}])

    user_ns = lambda rt: f"user-{rt.context.user_id}"  # noqa: E731
    mw = MemoryDistillMiddleware.from_memory(mem, namespace=user_ns, k=2, expose_recall_tool=True)
    estimate = make_predict_tool(namespace=user_ns, predictor_for=mem.try_predictor)
    calls = [{"name": "recall_past_episodes", "args": {"query": "Task: find"}, "id": "c1", "type": "tool_call"},
             {"name": "estimate_payoff", "args": {"plan": "search the web"}, "id": "c2", "type": "tool_call"}]
    model = ScriptedChatModel(responses=[AIMessage(content="", tool_calls=calls), AIMessage(content="Done.")])
    agent = create_agent(model, [estimate], middleware=[mw], context_schema=Ctx)
    q = {"messages": [HumanMessage("Task: find the population of Oslo in 2020.")]}
    alice = agent.invoke(q, context=Ctx("alice"))
    prompt = next(m for m in model.seen[-1] if isinstance(m, SystemMessage)).content
    recalled, estimated = (m.content for m in alice["messages"] if m.type == "tool")
    assert "±" in prompt and "bob" not in prompt  # alice's episodes, scored by alice's model (predicted mean±std)
    assert "±" in recalled and "bob" not in recalled  # the tool searched alice's namespace too
    assert "expected reward" in estimated and "model v000001" in estimated  # and alice's model estimated
    bob = asyncio.run(agent.ainvoke(q, context=Ctx("bob")))
    prompt = next(m for m in model.seen[-1] if isinstance(m, SystemMessage)).content
    assert "bob's spreadsheet" in prompt and "±" not in prompt  # bob's own, stored rewards: no model
    assert [m.content for m in bob["messages"] if m.type == "tool"][1].startswith("no model has learned")
    with pytest.raises(ValueError, match="give a predictor, or namespace="):
        make_predict_tool(namespace=user_ns)
    assert mem.store.get(alice["memory_distill_episode_id"]).namespace == "user-alice"
    assert mem.store.get(bob["memory_distill_episode_id"]).namespace == "user-bob"

    # a run whose context lacks what the function reads: recall is skipped and the episode dropped (logged), or
    # with errors="raise" a clear error
    broken = create_agent(ScriptedChatModel(responses=[AIMessage(content="Done.")]), [], middleware=[mw])
    out = broken.invoke(q)
    assert out["messages"][-1].content == "Done." and "memory_distill_episode_id" not in out
    assert "namespace=: the function raised AttributeError" in caplog.text
    strict = MemoryDistillMiddleware(mem.store, namespace=lambda rt: "", recall=False, errors="raise")
    with pytest.raises(InvalidMemoryError, match="namespace=: the function returned '' for this run"):
        create_agent(ScriptedChatModel(responses=[AIMessage(content="Done.")]), [], middleware=[strict]).invoke(q)
    with pytest.raises(TypeError, match="namespace must be a string or a function"):
        MemoryDistillMiddleware(mem.store, namespace=42)


def test_one_callback_handler_records_each_run_in_its_own_namespace(store, caplog):
    """EpisodeRecorder(namespace=fn of the run's metadata): the namespace comes from each run's config."""
    from memory_distill import InvalidMemoryError

    rec = EpisodeRecorder(store, namespace=lambda md: f"user-{md['user_id']}")
    agent = create_agent(ScriptedChatModel(responses=[AIMessage(content="Done.")]), [])
    for user in ("alice", "bob"):
        agent.invoke({"messages": [HumanMessage(f"{user}'s task")]},
                     config={"callbacks": [rec], "metadata": {"user_id": user}})
    assert [m.namespace for m in store.get_many(rec.episode_ids)] == ["user-alice", "user-bob"]
    agent.invoke({"messages": [HumanMessage("no user")]}, config={"callbacks": [rec]})  # dropped, logged
    assert len(rec.episode_ids) == 2 and "namespace=: the function raised KeyError" in caplog.text
    strict = EpisodeRecorder(store, namespace=lambda md: md.get("user_id"), errors="raise")
    with pytest.raises(InvalidMemoryError, match="namespace=: the function returned None"):
        agent.invoke({"messages": [HumanMessage("no user")]}, config={"callbacks": [strict]})


def test_a_namespace_function_can_read_the_user_from_the_run_config(store):
    """A user id in config["configurable"] (no context schema): the function reads it through get_config(), in
    the middleware's hooks and in the recall tool alike."""
    import langgraph.config

    mw = MemoryDistillMiddleware(store, namespace=lambda rt: langgraph.config.get_config()["configurable"]["user_id"],
                                 expose_recall_tool=True)
    agent = create_agent(ScriptedChatModel(responses=tool_then_answer("recall_past_episodes", {"query": "x"}, "Done.")),
                         [], middleware=[mw])
    first = agent.invoke({"messages": [HumanMessage("carol's report")]}, config={"configurable": {"user_id": "carol"}})
    second = agent.invoke({"messages": [HumanMessage("carol's report")]}, config={"configurable": {"user_id": "carol"}})
    assert store.get(first["memory_distill_episode_id"]).namespace == "carol"
    assert "carol's report" in [m.content for m in second["messages"] if m.type == "tool"][0]  # found in "carol"


def test_passing_the_memory_distill_object_where_a_store_or_predictor_goes_names_the_fix(tmp_path):
    """``MemoryDistill.open`` returns the object users hold, so it is what they pass first. It failed deep inside
    (a pydantic is-instance error, "no attribute '_check_reward'", "no attribute 'refresh'"), or half worked by
    duck typing (the vector store). A recorder only writes, so it takes the object's store."""
    from langchain_memory_distill import (
        MemoryDistillStore,
        MemoryDistillVectorStore,
        make_recall_tool,
    )

    from memory_distill import HashingEmbedder, MemoryDistill

    mem = MemoryDistill.open(tmp_path / "home", embedder=HashingEmbedder(dim=64))
    for cls in (MemoryDistillMiddleware, MemoryDistillVectorStore, MemoryDistillStore):
        with pytest.raises(TypeError, match=f"{cls.__name__} takes a MemoryStore, got a MemoryDistill: use "
                                            rf"{cls.__name__}.from_memory\(mem\).* or pass mem.store"):
            cls(mem)
    with pytest.raises(TypeError, match=r"ValueAwareRetriever.from_memory\(mem\)"):
        ValueAwareRetriever(store=mem)
    with pytest.raises(TypeError, match="needs a MemoryStore .*got NoneType"):
        MemoryDistillMiddleware(None)  # type: ignore[arg-type]
    for make in (lambda: RewardScorer(mem), lambda: make_predict_tool(mem)):  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="takes a Predictor, got a MemoryDistill: pass mem.predictor"):
            make()
    with pytest.raises(TypeError, match="needs a Predictor .*got NoneType"):
        RewardScorer(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"make_recall_tool needs a ValueAwareRetriever, e.g. .*from_memory\(mem\)"):
        make_recall_tool(mem)  # type: ignore[arg-type]
    recorder = EpisodeRecorder(mem)  # type: ignore[arg-type]
    assert recorder.store is mem.store and recorder.writer.store is mem.store
    for ok in (MemoryDistillMiddleware.from_memory(mem), ValueAwareRetriever.from_memory(mem)):
        assert ok is not None
