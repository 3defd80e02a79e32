"""Pagers: iterate the items of a List call across pages, following ``next_page_token``.

As in ``google.api_core``, a list method fetches the first page before it returns (so a bad request
fails at the call, not at the first iteration) and the pager fetches later pages as iteration reaches
them. A pager is single-use: iterate it, or its ``pages``, once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["AsyncPager", "Page", "Pager"]


class Page(Protocol):
    """A List response: any message with a ``next_page_token`` (empty on the last page)."""

    @property
    def next_page_token(self) -> str: ...


ItemT = TypeVar("ItemT")
PageT = TypeVar("PageT", bound=Page)


class AsyncPager(Generic[ItemT, PageT]):
    """Items of a List call across pages: ``async for item in pager``; ``.pages`` yields the responses."""

    def __init__(
        self,
        first_page: PageT,
        fetch: Callable[[str], Awaitable[PageT]],
        items: Callable[[PageT], Iterable[ItemT]],
    ) -> None:
        self._first_page = first_page
        self._fetch = fetch
        self._items = items

    @property
    def first_page(self) -> PageT:
        """The response to the first request (already fetched)."""
        return self._first_page

    @property
    def pages(self) -> AsyncIterator[PageT]:
        """The responses, page by page, fetching each next one as the previous one is consumed."""
        return self._iter_pages()

    async def _iter_pages(self) -> AsyncIterator[PageT]:
        page = self._first_page
        yield page
        while page.next_page_token:
            page = await self._fetch(page.next_page_token)
            yield page

    def __aiter__(self) -> AsyncIterator[ItemT]:
        return self._iter_items()

    async def _iter_items(self) -> AsyncIterator[ItemT]:
        async for page in self.pages:
            for item in self._items(page):
                yield item


class Pager(Generic[ItemT, PageT]):
    """Items of a List call across pages: ``for item in pager``; ``.pages`` yields the responses."""

    def __init__(
        self,
        first_page: PageT,
        fetch: Callable[[str], PageT],
        items: Callable[[PageT], Iterable[ItemT]],
    ) -> None:
        self._first_page = first_page
        self._fetch = fetch
        self._items = items

    @property
    def first_page(self) -> PageT:
        """The response to the first request (already fetched)."""
        return self._first_page

    @property
    def pages(self) -> Iterator[PageT]:
        """The responses, page by page, fetching each next one as the previous one is consumed."""
        page = self._first_page
        yield page
        while page.next_page_token:
            page = self._fetch(page.next_page_token)
            yield page

    def __iter__(self) -> Iterator[ItemT]:
        for page in self.pages:
            yield from self._items(page)
