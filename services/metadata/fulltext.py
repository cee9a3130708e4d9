"""Keyword search over captions and tags: SQLite FTS5 or PostgreSQL full-text search.

A query is cut into words (letters and digits; everything else separates, as both databases'
tokenizers do) and matched with OR semantics: an item matching more words, rarer words, or
matching them more often ranks higher (BM25 on SQLite, ``ts_rank_cd`` on PostgreSQL). The words
are passed as one bound parameter; each is quoted for FTS5 and contains no tsquery operator
characters for PostgreSQL, so no query text can change the search's syntax.

- ``target="image"`` ranks items by their search text: every caption and every tag.
- ``target="text"`` ranks captions by their own text.
"""

from __future__ import annotations

import re
from typing import Any, Final

from sqlalchemy import ColumnElement, Select, column, func, literal_column, select, table

from services.metadata.models import PG_TEXT_CONFIG, Caption, Item
from shared.problems import Unprocessable

MAX_TERMS: Final = 32
_WORD = re.compile(r"[^\W_]+")

_ITEMS_FTS = table("items_fts", column("rowid"), column("search_text"))
_CAPTIONS_FTS = table("captions_fts", column("rowid"), column("text"))


def query_terms(query: str) -> list[str]:
    """The distinct lowercased words of ``query`` (at most ``MAX_TERMS``); 422 if none."""
    terms = list(dict.fromkeys(word.lower() for word in _WORD.findall(query)))
    if not terms:
        raise Unprocessable(
            "the query has no words to search for (letters or digits)", code="invalid_query"
        )
    return terms[:MAX_TERMS]


def keyword_select(
    dialect: str, target: str, terms: list[str], conditions: list[ColumnElement[bool]]
) -> Select[Any]:
    """SELECT id, item_id, score of matches, best first, restricted by ``conditions`` on Item."""
    if dialect == "postgresql":
        query = func.to_tsquery(PG_TEXT_CONFIG, " | ".join(terms))
        document = Item.search_text if target == "image" else Caption.text
        # The same expression as the GIN index, so the index serves the match.
        vector = func.to_tsvector(PG_TEXT_CONFIG, document)
        score = func.ts_rank_cd(vector, query).label("score")
        match = vector.op("@@")(query)
        if target == "image":
            statement = select(Item.id.label("id"), Item.id.label("item_id"), score)
        else:
            statement = select(
                Caption.id.label("id"), Caption.item_id.label("item_id"), score
            ).join(Item, Item.id == Caption.item_id)
        return statement.where(match, *conditions).order_by(score.desc(), literal_column("id"))

    expression = " OR ".join(f'"{term}"' for term in terms)
    if target == "image":
        fts, matched_column, key = _ITEMS_FTS, _ITEMS_FTS.c.search_text, Item.id
        rank = func.bm25(literal_column("items_fts"))
        statement = select(Item.id.label("id"), Item.id.label("item_id"), (-rank).label("score"))
        statement = statement.select_from(fts).join(Item, Item.id == fts.c.rowid)
    else:
        fts, matched_column, key = _CAPTIONS_FTS, _CAPTIONS_FTS.c.text, Caption.id
        rank = func.bm25(literal_column("captions_fts"))
        statement = select(
            Caption.id.label("id"), Caption.item_id.label("item_id"), (-rank).label("score")
        )
        statement = (
            statement.select_from(fts)
            .join(Caption, Caption.id == fts.c.rowid)
            .join(Item, Item.id == Caption.item_id)
        )
    # bm25() is lower-is-better; its negation sorts like a score.
    return statement.where(matched_column.op("MATCH")(expression), *conditions).order_by(rank, key)
