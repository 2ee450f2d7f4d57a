"""Errors of the retriever and its item lifecycle (a light module: the HTTP server maps them by type)."""


class RetrieverError(ValueError):
    """A run folder is incomplete, or a search request is malformed; the message names the problem."""


class SearchModeUnavailableError(RetrieverError):
    """A well-formed search asks for a mode this run cannot serve (e.g. hybrid without RUN/hybrid)."""


class ItemConflictError(RetrieverError):
    """An added item id is already known (trained, added, folded or deleted: ids are never reused)."""


class WriterLockError(RetrieverError):
    """Another process holds the run's writer lock (it is adding or deleting items)."""


class MessageKeyError(KeyError):
    """A KeyError whose str() is its message (KeyError's own would repr() it): the not-found errors' base."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class ItemNotFoundError(RetrieverError, MessageKeyError):
    """An item id is unknown, or already deleted."""
