"""Which catalog model answers a request: the one it names (if that model serves the
route), the route's default (the first preferred entry that can be served now: any when
the hub is online, a local one offline), or the one for a language pair."""

from __future__ import annotations

from app.catalog import Entry, TranslationEntry
from app.errors import ModelNotFound, WrongTask
from app.registry.slots import Models, ModelState
from app.registry.sources import is_local
from app.tasks import Endpoint, can_serve


class ModelChoice:
    def __init__(self, registry: Models) -> None:
        self.registry = registry
        self._names: dict[Endpoint, list[str]] = {}  # the catalog is fixed once the server starts

    def names_for(self, endpoint: Endpoint) -> list[str]:
        names = self._names.get(endpoint)
        if names is None:
            names = self._names[endpoint] = [
                s.entry.name for s in self.registry.slots() if can_serve(s.entry, endpoint)
            ]
        return names

    def resolve(self, name: str | None, endpoint: Endpoint) -> Entry:
        """The entry that answers ``endpoint``: the named one, else the endpoint's default."""
        if name is None:
            return self.registry.slot(self.default_for(endpoint)).entry
        if not self.registry.has(name):
            raise ModelNotFound(
                f"unknown model '{name}'; models for /{endpoint.value}: {', '.join(self.names_for(endpoint)) or 'none'}"
            )
        entry = self.registry.slot(name).entry
        if not can_serve(entry, endpoint):
            hint = " with fixed labels (or pass candidate_labels)" if entry.task == "zero-shot-classification" else ""
            raise WrongTask(
                f"model '{name}' serves {entry.task}{hint}, not /{endpoint.value}; "
                f"use one of: {', '.join(self.names_for(endpoint)) or 'none'}"
            )
        return entry

    def default_for(self, endpoint: Endpoint) -> str:
        """First preferred entry that can be served now: any when online, a local one offline."""
        preferred = self.registry.catalog.defaults.get(endpoint) or self.names_for(endpoint)
        if not preferred:
            raise ModelNotFound(f"the catalog has no model for /{endpoint.value}; add one to the catalog")
        return self._first_servable(preferred)

    def find_translation(self, source_lang: str | None, target_lang: str | None) -> TranslationEntry:
        """The translation entry for a language pair; either side may be left open."""
        pairs = [s.entry for s in self.registry.slots() if isinstance(s.entry, TranslationEntry)]
        matching = [e.name for e in pairs if translates(e, source_lang, target_lang)]
        if not matching:
            known = ", ".join(sorted({f"{e.source_lang}->{e.target_lang}" for e in pairs})) or "none"
            asked = f"{source_lang or '*'}->{target_lang or '*'}"
            raise ModelNotFound(f"no catalog model translates {asked}; available pairs: {known}")
        preferred = [n for n in self.registry.catalog.defaults.get(Endpoint.translate, []) if n in matching]
        name = self._first_servable(preferred + [n for n in matching if n not in preferred])
        return next(e for e in pairs if e.name == name)

    def _first_servable(self, names: list[str]) -> str:
        if self.registry.hub_online:
            return names[0]
        for name in names:
            slot = self.registry.slot(name)
            if slot.state is ModelState.loaded or is_local(slot.entry):
                return name
        return names[0]  # nothing local: its load will answer 503 with how to provide it


def translates(entry: TranslationEntry, source_lang: str | None, target_lang: str | None) -> bool:
    """Whether a translation entry matches the languages given (None: any)."""
    return source_lang in (None, entry.source_lang) and target_lang in (None, entry.target_lang)
