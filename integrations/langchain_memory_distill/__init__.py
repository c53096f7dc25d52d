"""LangChain adapters for memory_distill: attach episodic memory with a learned value to agents."""

from memory_distill.grading import AnswerGrader, bleu, exact_match, token_f1

from .callbacks import EpisodeRecorder
from .embeddings import MemoryDistillEmbeddings
from .episodes import EpisodeWriter, episode_from_messages, episode_text
from .langgraph_store import MemoryDistillStore
from .middleware import MemoryDistillMiddleware, MemoryDistillState
from .retriever import ValueAwareRetriever
from .router import RewardRouter
from .scorer import RewardScorer, best_of_n
from .tools import make_predict_tool, make_recall_tool
from .vectorstore import MemoryDistillVectorStore

__all__ = [
    "AnswerGrader",
    "EpisodeRecorder",
    "EpisodeWriter",
    "MemoryDistillEmbeddings",
    "MemoryDistillMiddleware",
    "MemoryDistillStore",
    "MemoryDistillVectorStore",
    "MemoryDistillState",
    "RewardRouter",
    "RewardScorer",
    "ValueAwareRetriever",
    "best_of_n",
    "bleu",
    "episode_from_messages",
    "episode_text",
    "exact_match",
    "make_predict_tool",
    "make_recall_tool",
    "token_f1",
]
