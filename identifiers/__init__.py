"""Semantic identifiers (k, v1..vM, u): K-Means + RQ-VAE + ID table + prefix trie."""
from .config import IdentifierConfig
from .id_table import IdTable, IdTableError
from .inputs import IdentifierInputError, check_embeddings, load_embeddings
from .semantic_ids import FORMAT_VERSION, SemanticIdTokenizer, TokenizerFormatError
from .trie import FlatTrie, IdentifierTrie, TrieError

__all__ = ["IdentifierConfig", "IdTable", "IdTableError", "IdentifierInputError", "check_embeddings",
           "load_embeddings", "FORMAT_VERSION", "SemanticIdTokenizer", "TokenizerFormatError",
           "FlatTrie", "IdentifierTrie", "TrieError"]
