"""Turn an agent run's messages into one episode text (input, tool calls, results, answer)."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from memory_distill.errors import InvalidMemoryError
from memory_distill.store import MemoryStore, coerce_memory
from memory_distill.types import check_flag, check_reward_value, is_int, is_real

__all__ = ["RECENT_IDS", "EpisodeWriter", "NamespaceFn", "check_callable_as", "check_episode_settings", "check_predictor",
           "check_store", "current_thread_id",
           "episode_from_messages", "episode_metadata", "episode_text", "input_group", "message_text", "record_episode",
           "response_model_name", "run_namespace"]

log = logging.getLogger(__name__)
Errors = Literal["warn", "raise"]


def check_store(store: Any, who: str, *, has_from_memory: bool = True) -> MemoryStore:
    """``store`` as a MemoryStore. A :class:`~memory_distill.MemoryDistill` (what ``MemoryDistill.open`` returns, an
    easy thing to pass here) is taken as its store where that is all ``who`` uses, and otherwise refused with the
    ``from_memory`` constructor that also wires in its models; anything else is a TypeError naming the fix."""
    if isinstance(store, MemoryStore):
        return store
    from memory_distill.facade import MemoryDistill

    if isinstance(store, MemoryDistill):
        if not has_from_memory:
            return store.store
        raise TypeError(f"{who} takes a MemoryStore, got a MemoryDistill: use {who}.from_memory(mem), which also "
                        "scores with the models mem publishes, or pass mem.store")
    raise TypeError(f"{who} needs a MemoryStore (mem.store, or MemoryStore(...)), got {type(store).__name__}")


def check_predictor(predictor: Any, who: str) -> Any:
    """``predictor`` if it is a Predictor; a MemoryDistill or anything else is a TypeError naming the fix."""
    from memory_distill.facade import MemoryDistill
    from memory_distill.predictor import Predictor

    if isinstance(predictor, Predictor):
        return predictor
    if isinstance(predictor, MemoryDistill):
        raise TypeError(f"{who} takes a Predictor, got a MemoryDistill: pass mem.predictor (the model serving the "
                        "top level) or mem.predictor_for(namespace)")
    raise TypeError(f"{who} needs a Predictor (mem.predictor, once a consolidation has published a model), got "
                    f"{type(predictor).__name__}")


class EpisodeWriter:
    """Writes recorded episodes to the store, keeping them when it is unreachable.

    ``errors="warn"``: an episode whose write fails waits in :attr:`unsaved` (at most
    ``max_unsaved``, oldest dropped first) and is written, in one atomic batch with the others
    waiting, with the next episode that gets through or by :meth:`flush`. ``errors="raise"``:
    the store's error propagates (the episode still waits for a later flush).

    ``background=True`` takes the write, and the grading (``write(..., grade=)``: a ``reward_fn``,
    perhaps an LLM judge), off the caller's path: :meth:`write` returns the id at once; a grader thread
    runs the judges in order and a writer thread writes, batching the episodes that queued up meanwhile
    (a slow judge never holds up the writes of other episodes). A late
    :meth:`set_reward` reaches an episode wherever it is (grading, waiting, in flight) and wins over the
    grader. :meth:`flush` waits for everything queued before it; the queue is also drained when the
    interpreter exits. The threads' errors are logged; with ``errors="raise"`` the first one since the caller
    last heard of it (a failed write, a judge that raised) is also raised by the next :meth:`write` (after
    queueing that episode) or :meth:`flush`. A write error is forgotten once a later write gets through. While
    ``max_unsaved`` episodes already await grading (a slow or hung judge), new ones are stored pending,
    ungraded (logged), so memory stays bounded and nothing waits behind the judge.
    """

    BATCH = 64
    """Background: episodes written in one batch at most before the writer stops waiting for the queue."""
    MAX_DELAY_S = 1.0
    """Background: how long a graded episode waits for the ones queued behind it before it is written anyway."""

    def __init__(self, store: MemoryStore, *, errors: Errors = "warn", max_unsaved: int = 1000,
                 background: bool = False) -> None:
        if errors not in ("warn", "raise"):
            raise ValueError(f"errors must be 'warn' or 'raise', got {errors!r}")
        if not is_int(max_unsaved) or max_unsaved < 1:
            raise ValueError(f"max_unsaved must be an int >= 1 (episodes held while the store is away), got "
                             f"{max_unsaved!r}")
        store = check_store(store, "EpisodeWriter", has_from_memory=False)
        self.store, self.errors, self.max_unsaved = store, errors, max_unsaved
        self.background = check_flag(background, "background", "grade and write off the agent's path")
        self.unsaved: OrderedDict[str, dict[str, Any]] = OrderedDict()
        """Episodes written to this writer but not yet to the store (graded ones), oldest first, by id."""
        self._grading: dict[str, dict[str, Any]] = {}  # background: episodes whose grade() has not run yet
        self._lock = threading.Lock()  # guards unsaved and _grading (held briefly, never during a write)
        self._write_lock = threading.Lock()  # one store write at a time
        self._pools: dict[str, ThreadPoolExecutor] = {}  # background: "grader" and "writer", one thread each
        self._thread_name = f"memory-distill-writer-{id(self):x}"
        self._queued = 0  # write tasks submitted to the writer thread and not started yet
        # background + errors="raise": the threads' errors, raised by the next write() or flush()
        self._write_error: Exception | None = None
        self._grade_error: Exception | None = None

    def grade(self, reward_fn: Callable[[str, str, list[Any]], float | None] | None, question: str, answer: str,
              messages: list[Any]) -> float | None:
        """``reward_fn``'s reward for an episode, checked against the store's range. With ``errors="warn"`` a
        reward_fn that raises or returns a bad reward leaves the episode pending (``None``, logged)."""
        if reward_fn is None:
            return None
        try:
            reward = reward_fn(question, answer, messages)
            return None if reward is None else self._valid_reward(reward, "reward_fn's reward")
        except Exception as e:
            if self.errors == "raise":
                raise
            log.warning("memory_distill: reward_fn failed (%s: %s); the episode stays pending", type(e).__name__, e)
            return None

    def grader(self, reward_fn: Callable[[str, str, list[Any]], float | None] | None, question: str, answer: str,
               messages: list[Any], *, failed: bool, failure_reward: float | None) -> Callable[[], float | None]:
        """The ``grade`` a recorder passes to :meth:`write`: ``reward_fn``'s reward (:meth:`grade`), or
        ``failure_reward`` when there is none and the run failed."""
        def grade() -> float | None:
            reward = self.grade(reward_fn, question, answer, messages)
            return failure_reward if reward is None and failed else reward

        return grade

    def write(self, text: str, reward: float | None, metadata: dict[str, Any], namespace: str, *,
              grade: Callable[[], float | None] | None = None) -> str:
        """Store one episode (now, or once the store is back; in the background threads with ``background``);
        returns its id.

        ``grade``: computes the reward when ``reward`` is ``None`` (here, or in the grader thread).
        An invalid episode (a metadata value Chroma cannot hold, a reward out of range) raises
        :class:`~memory_distill.InvalidMemoryError` here, whatever ``errors`` says: it is never queued, so
        it cannot hold back the episodes after it. An error raised after the episode was queued (``errors="raise"``:
        the store is away, or a background thread's earlier error) carries the episode's id as
        ``error.episode_id``: the episode is kept and written later, and takes a late reward by that id."""
        mid = uuid.uuid4().hex
        now = time.time()
        memory: dict[str, Any] = {"id": mid, "text": text, "reward": reward, "metadata": metadata,
                                  "namespace": namespace, "created_at": now}
        coerce_memory(memory)
        if reward is not None:
            memory["reward"] = self._valid_reward(reward, "reward")
            memory["rewarded_at"] = now
            grade = None
        if grade is not None and not self.background:
            self._set(memory, grade())
            grade = None
        with self._lock:
            if grade is not None and len(self._grading) >= self.max_unsaved:
                # the grader is far behind (a slow or hung judge): keep the episode, pending, rather than the queue
                log.warning("memory_distill: %d episodes await grading (max_unsaved=%d); episode %s is stored "
                            "pending, without reward_fn", len(self._grading), self.max_unsaved, mid)
                grade = None
            if grade is None:
                self._enqueue(memory)
            else:
                self._grading[mid] = memory
        try:
            if not self.background:
                self._try_flush(f"episode {mid} not written yet")
            elif grade is not None:
                self._submit_grade(mid, grade)
            else:
                self._submit_write()
            self._raise_deferred()
        except Exception as e:
            # the episode is queued and will be written: the caller keeps its id for a late reward
            _attach_episode_id(e, mid)
            raise
        return mid

    def write_or_drop(self, text: str, metadata: dict[str, Any], namespace: str | NamespaceFn,
                      grade: Callable[[], float | None] | None, run: Any = None) -> str | None:
        """:meth:`write` for the recorders: with ``errors="warn"`` an invalid episode is dropped and logged
        (``None``), so memory never takes the agent down; ``errors="raise"`` raises. ``namespace`` may be a
        function of ``run`` (the run's runtime or metadata); one that cannot give a namespace drops the episode
        the same way."""
        try:
            return self.write(text, None, metadata, run_namespace(namespace, run), grade=grade)
        except InvalidMemoryError as e:
            if self.errors == "raise":
                raise
            log.error("memory_distill: episode dropped, it cannot be stored: %s", e)
            return None

    def _valid_reward(self, reward: Any, what: str) -> float:
        """``reward`` as a float in the store's range, else :class:`InvalidMemoryError` (raised before the episode
        is queued: a True or an array queued would fail every batch after it)."""
        try:
            value = check_reward_value(reward, what)
        except ValueError as e:
            raise InvalidMemoryError(str(e)) from None
        self.store._check_reward(value, what)
        return value

    def _set(self, memory: dict[str, Any], reward: float | None) -> None:
        if reward is not None:
            memory.update(reward=self._valid_reward(reward, "reward"), rewarded_at=time.time())

    def _enqueue(self, memory: dict[str, Any]) -> None:  # with self._lock held
        self.unsaved[memory["id"]] = memory
        while len(self.unsaved) > self.max_unsaved:
            old, _ = self.unsaved.popitem(last=False)
            log.warning("memory_distill: dropped unsaved episode %s (more than max_unsaved=%d waiting)",
                        old, self.max_unsaved)

    # ------------------------------------------------------------------ the grader and writer threads

    def _pool(self, role: str) -> ThreadPoolExecutor:
        with self._lock:
            pool = self._pools.get(role)
            if pool is None:
                pool = self._pools[role] = ThreadPoolExecutor(1, thread_name_prefix=f"{self._thread_name}-{role}")
            return pool

    def _submit_grade(self, mid: str, grade: Callable[[], float | None]) -> None:
        try:
            self._pool("grader").submit(self._graded, mid, grade)
        except RuntimeError:  # the interpreter is shutting down: no new threads, so do it here
            self._graded(mid, grade)

    def _submit_write(self) -> None:
        with self._lock:
            self._queued += 1
        try:
            self._pool("writer").submit(self._write_task)
        except RuntimeError:
            self._write_task()

    def _graded(self, mid: str, grade: Callable[[], float | None]) -> None:
        """Grader thread: run the judge, then hand the episode to the writer (a slow judge never holds up
        the writes of other episodes)."""
        error: Exception | None = None
        try:
            reward = grade()
        except Exception as e:
            log.warning("memory_distill: grading episode %s failed (%s: %s); it stays pending", mid,
                        type(e).__name__, e)
            error, reward = e, None
        with self._lock:
            memory = self._grading.pop(mid, None)
            if memory is not None and memory["reward"] is None:  # a set_reward() during grading wins
                try:
                    self._set(memory, reward)
                except Exception as e:
                    log.warning("memory_distill: %s; episode %s stays pending", e, mid)
                    error = error or e
            if error is not None and self.errors == "raise" and self._grade_error is None:
                self._grade_error = error  # raised by the next write() or flush()
            if memory is None:
                return
            self._enqueue(memory)
        self._submit_write()

    def _raise_deferred(self) -> None:
        """Raise (once) what the background threads hit since the caller last heard: a judge's error first."""
        error: Exception | None
        with self._lock:
            if self._grade_error is not None:
                error, self._grade_error = self._grade_error, None
            else:
                error, self._write_error = self._write_error, None
        if error is not None:
            raise error

    def _write_task(self) -> None:
        """Writer thread: write what waits, in one batch; while more write tasks are queued behind this one,
        leave it to the last of them (unless enough wait already, or the oldest has waited a while)."""
        with self._lock:
            self._queued -= 1
            oldest = next(iter(self.unsaved.values()), None)
            if oldest is None or (self._queued and len(self.unsaved) < self.BATCH
                                  and time.time() - oldest["created_at"] < self.MAX_DELAY_S):
                return
        self._try_flush("episodes not written yet", raising=False)

    def _drain(self) -> None:
        """Wait until the grader, then the writer, have run everything submitted so far."""
        if threading.current_thread().name.startswith(self._thread_name):
            return
        for role in ("grader", "writer"):  # graded episodes are handed to the writer before their task ends
            pool = self._pools.get(role)
            if pool is not None:
                try:
                    pool.submit(lambda: None).result()
                except RuntimeError:
                    pass

    def close(self) -> None:
        """Write what is queued (as :meth:`flush`) and stop the background threads."""
        try:
            self.flush()
        finally:
            with self._lock:
                pools, self._pools = list(self._pools.values()), {}
            for pool in pools:
                pool.shutdown(wait=True)

    # ------------------------------------------------------------------ flushing

    def flush(self) -> int:
        """Write every waiting episode in one atomic batch; returns how many this call wrote. Raises if the
        store is still away. With ``background`` it first waits for the episodes queued before it, and with
        ``errors="raise"`` then raises a judge's error the grader thread met since the caller last heard."""
        self._drain()
        try:
            n = self._flush_now()
        except Exception:
            with self._lock:
                self._write_error = None  # the caller hears of the outage now
            raise
        self._raise_deferred()
        return n

    def _flush_now(self) -> int:
        with self._write_lock:
            with self._lock:
                batch = [dict(m) for m in self.unsaved.values()]
            if not batch:
                return 0
            self.store.add_many(batch, upsert=True)  # upsert: idempotent if an earlier try got through
            with self._lock:
                self._write_error = None  # writes get through again
                for m in batch:  # a set_reward() while the batch was in flight keeps that episode waiting
                    cur = self.unsaved.get(m["id"])
                    if cur is not None and (cur["reward"], cur.get("rewarded_at")) == (m["reward"], m.get("rewarded_at")):
                        del self.unsaved[m["id"]]
        return len(batch)

    def set_reward(self, episode_id: str, reward: float) -> None:
        """A late reward: on the waiting copy if the episode is not written yet, else in the store."""
        if not isinstance(episode_id, str):  # (a list failed as "unhashable type")
            raise TypeError(f"episode_id must be one episode's id (a str, from the run's memory_distill_episode_id), "
                            f"got {type(episode_id).__name__}")
        with self._lock:
            waiting = self.unsaved.get(episode_id) or self._grading.get(episode_id)
            if waiting is not None:
                waiting.update(reward=self._valid_reward(reward, "reward"), rewarded_at=time.time())
            grading = episode_id in self._grading
        if waiting is None:
            self.store.set_reward(episode_id, reward)
        elif grading:
            pass  # written once graded
        elif self.background:
            self._submit_write()
        else:
            self._try_flush(f"episode {episode_id} still waiting")

    def _try_flush(self, what: str, raising: bool = True) -> None:
        try:
            self._flush_now()
        except Exception as e:
            if self.errors == "raise":
                if raising:
                    raise
                with self._lock:  # the writer thread: raised by the next write() or flush()
                    self._write_error = e
            log.warning("memory_distill: %s, %d waiting (%s: %s); retried with the next episode or flush()",
                        what, len(self.unsaved), type(e).__name__, e)


RECENT_IDS = 10_000
"""How many of the latest episode ids a recorder keeps in ``episode_ids`` (a long-running server records millions)."""


def record_episode(writer: EpisodeWriter, recent: list[str], text: str, metadata: dict[str, Any],
                   namespace: str | NamespaceFn, run: Any, grade: Callable[[], float | None] | None) -> str | None:
    """A recorder's write (:meth:`EpisodeWriter.write_or_drop`), its id appended to ``recent`` (the last
    :data:`RECENT_IDS`), also when an error raised after the episode was queued carries it."""
    try:
        mid = writer.write_or_drop(text, metadata, namespace, grade, run)
    except Exception as e:
        if getattr(e, "episode_id", None):  # errors="raise" after the episode was queued: it is kept
            _keep_recent(recent, e.episode_id)  # type: ignore[attr-defined]
        raise
    if mid is not None:
        _keep_recent(recent, mid)
    return mid


def _keep_recent(recent: list[str], episode_id: str) -> None:
    recent.append(episode_id)
    if len(recent) > RECENT_IDS:
        del recent[0]


def _attach_episode_id(error: BaseException, episode_id: str) -> None:
    """Set ``error.episode_id``: the id of the episode queued by the call that raised (kept, written later)."""
    try:
        error.episode_id = episode_id  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # an exception type with __slots__
        pass


def check_callable_as(fn: Any, args: tuple[Any, ...], what: str) -> None:
    """A ``TypeError`` starting with ``what`` when ``fn`` cannot be called with ``args`` (checked on its signature,
    without calling it); a callable whose signature cannot be read passes."""
    try:
        inspect.signature(fn).bind(*args)
    except TypeError as e:
        raise TypeError(f"{what}: {e}") from None
    except ValueError:  # no signature to read (some builtins): it is called as it is
        pass


def check_episode_settings(store: MemoryStore, metadata: dict[str, Any] | None, namespace: str,
                           failure_reward: float | None, reward_fn: Any = None) -> dict[str, Any]:
    """A recorder's ``metadata=``, ``namespace=``, ``failure_reward`` and ``reward_fn``, checked once when it is
    built (a value Chroma cannot hold, or a judge that cannot take ``(question, answer, messages)``, fails here,
    naming the fix, not as a warning on every episode later); returns a copy of the metadata."""
    if reward_fn is not None:
        if not callable(reward_fn):
            raise TypeError(f"reward_fn must be a function (question, answer, messages) -> reward or None, got "
                            f"{type(reward_fn).__name__} {reward_fn!r}: a fixed reward for every run is "
                            "lambda q, a, m: 1.0")
        check_callable_as(reward_fn, ("question", "answer", []), "reward_fn must take (question, answer, messages)")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata= must be a dict recorded with every episode, e.g. {{'agent': 'planner-v2'}}, got "
                        f"{type(metadata).__name__} {metadata!r}")
    if failure_reward is not None:
        if not is_real(failure_reward):
            raise TypeError(f"failure_reward must be a reward (a number) for a run that raised, or None to record "
                            f"no reward, got {type(failure_reward).__name__} {failure_reward!r}")
        store._check_reward(float(failure_reward), "failure_reward")
    try:
        coerce_memory({"text": "(settings check)", "metadata": dict(metadata or {}), "namespace": namespace})
    except InvalidMemoryError as e:
        raise InvalidMemoryError(str(e).replace("memory is invalid", "metadata= / namespace= are invalid")) from None
    return dict(metadata or {})


def input_group(user_input: str) -> str:
    """The ``group`` recorded episodes get by default: one per user input (case and whitespace folded).

    Attempts at the same input (retries, best-of-n samples, several agents on one benchmark
    question) share it, so consolidation never splits them across train and held-out rows and can
    fit the best-of-n ranking head on them (:mod:`memory_distill.ranking`).
    """
    norm = " ".join(user_input.lower().split())
    return "input:" + hashlib.sha1(norm.encode("utf-8")).hexdigest()[:16]


def message_text(m: BaseMessage) -> str:
    c = m.content
    if isinstance(c, str):
        return c
    parts = []
    for block in c:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return " ".join(parts)


def episode_from_messages(messages: Sequence[BaseMessage], *, max_result_chars: int = 300) -> dict[str, Any]:
    """``{"text", "input", "answer", "tool_calls", "tool_errors", "model"}`` for the last user turn.

    ``model``: the chat model that answered, from the last AI message's ``response_metadata``
    (``model_name`` or ``model``, as the provider integrations set it), else ``None``.
    """
    start = 0
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], HumanMessage):
            start = i
            break
    turn = list(messages[start:])
    user = message_text(turn[0]) if turn and isinstance(turn[0], HumanMessage) else ""
    lines = [f"User: {user}"]
    answer = ""
    n_calls = n_errors = 0
    model: str | None = None
    for m in turn[1:]:
        if isinstance(m, AIMessage):
            model = response_model_name(m.response_metadata) or model
            for tc in m.tool_calls:
                n_calls += 1
                lines.append(f"Tool call: {tc['name']}({json.dumps(tc.get('args', {}), sort_keys=True, default=str)})")
            text = message_text(m)
            if text and not m.tool_calls:
                answer = text
        elif isinstance(m, ToolMessage):
            err = getattr(m, "status", "success") == "error"
            n_errors += err
            lines.append(f"Tool {'error' if err else 'result'} ({m.name}): {message_text(m)[:max_result_chars]}")
    lines.append(f"Answer: {answer}" if answer else "Answer: (none)")
    return {"text": "\n".join(lines), "input": user, "answer": answer, "tool_calls": n_calls, "tool_errors": n_errors,
            "model": model}


def episode_text(question: str, answer: str) -> str:
    """The text the middleware and the callback handler record for a run that answered ``question`` with
    ``answer`` and called no tool: score candidate answers in this shape (``best_of_n(..., question=)``), so the
    student sees what it was trained on rather than a bare answer that reads as a very short episode."""
    return str(episode_from_messages([HumanMessage(question), AIMessage(answer)])["text"])


def episode_metadata(user_input: str, model: str | None, user: dict[str, Any], *, thread_id: Any = None,
                     **recorded: Any) -> dict[str, Any]:
    """The metadata a recorded episode gets: ``group`` (:func:`input_group`), ``model`` and the conversation's
    ``thread_id`` (a LangGraph checkpointer's) as defaults, the user's ``metadata=`` over them, then what the
    recorder itself observed (``source``, counts, outcome)."""
    return {"group": input_group(user_input), **({"model": model} if model else {}),
            **({"thread_id": str(thread_id)} if thread_id is not None else {}), **user, **recorded}


NamespaceFn = Callable[[Any], str]
"""A run's namespace from its LangGraph runtime (``runtime.context``), e.g. ``lambda rt: f"user-{rt.context.user_id}"``."""


def run_namespace(namespace: str | NamespaceFn, runtime: Any) -> str:
    """``namespace`` itself, or what the function gives for this run's ``runtime``, checked."""
    if isinstance(namespace, str):
        return namespace
    try:
        ns = namespace(runtime)
    except Exception as e:
        raise InvalidMemoryError(f"namespace=: the function raised {type(e).__name__}: {e} for this run "
                                 "(does the agent's context carry what it reads?)") from e
    if not isinstance(ns, str) or not ns:
        raise InvalidMemoryError(f"namespace=: the function returned {ns!r} for this run; it must return a "
                                 "non-empty string (a team, user or project name)")
    return ns


def current_thread_id() -> str | None:
    """The ``thread_id`` of the LangGraph run this is called from (a checkpointer's conversation), if any."""
    try:
        from langgraph.config import get_config

        tid = (get_config().get("configurable") or {}).get("thread_id")
    except Exception:  # outside a LangGraph run
        return None
    return None if tid is None else str(tid)


def response_model_name(meta: Any) -> str | None:
    """The model name a provider put in ``response_metadata`` / ``llm_output`` (``model_name`` or ``model``)."""
    if not isinstance(meta, dict):
        return None
    name = meta.get("model_name") or meta.get("model")
    return str(name) if name else None
