"""`drover policies [NAME]`: the migration policies a job may name, and their values.

Read from drover.toml alone (no Redis): the shipped policies (config/policy_model.py) and
every `[policies.NAME]` table. A policy is shown as it stands over `default`: a field its own
table leaves out is `default`'s, and says so. On a job, the layers between them (the domain's
metadata, its host's and group's policies) may set such a field too: `drover job ID` shows what
a job really ran with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from producer.cli_common import guarded, out, print_json
from producer.text import plain

if TYPE_CHECKING:  # the models are imported when the command runs, not by `drover --help`
    from config.policy_model import EffectivePolicy
    from config.settings import Settings


def register(app: typer.Typer) -> None:
    """Add this module's command to the `drover` CLI."""
    app.command()(policies)


def defined_in(settings: Settings, name: str) -> str:
    """`shipped`, `drover.toml`, or both (a drover.toml table over a shipped policy)."""
    from config.policy_model import BUILTIN_POLICIES

    places = (("shipped", name in BUILTIN_POLICIES), ("drover.toml", name in settings.policies))
    return " + ".join(where for where, there in places if there)


def standing(settings: Settings, name: str) -> EffectivePolicy:
    """Policy `name` over `default`, each value labelled with where it comes from: `shipped`
    or `drover.toml` (its own), `default (shipped)` or `default (drover.toml)` (inherited).
    UnknownPolicy (one line) for a name no layer defines."""
    from config.policy_model import DEFAULT_POLICY, EffectivePolicy, layered
    from jobs.policy_choice import named_layers

    layers = named_layers(settings, DEFAULT_POLICY, DEFAULT_POLICY)
    if name != DEFAULT_POLICY:
        layers += named_layers(settings, name, name)
    stacked = layered(layers)
    own = f"{name} ("
    sources = {
        field: label[len(own) : -1] if label.startswith(own) else label
        for field, label in stacked.sources.items()
    }
    return EffectivePolicy(name=name, values=stacked.values, sources=sources)


def _entry(settings: Settings, name: str) -> dict[str, Any]:
    from config.policy_model import policy_problems

    policy = standing(settings, name)
    return {
        "name": name,
        "defined_in": defined_in(settings, name),
        "values": policy.values.model_dump(mode="json"),
        "sources": policy.sources,
        "problems": policy_problems(policy.values),
    }


def policies(
    name: Annotated[
        str | None, typer.Argument(help="one policy, with where each value comes from")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the migration policies (shipped and drover.toml) with their values."""
    from config.settings import load_settings
    from producer.render import policies_table, policy_table

    def go() -> None:
        settings = load_settings()
        names = [name] if name is not None else settings.policy_names()
        entries = [_entry(settings, n) for n in names]
        if as_json:
            print_json(entries[0] if name is not None else entries)
            return
        if name is not None:
            policy = standing(settings, name)
            title = f"policy {name} ({defined_in(settings, name)})"
            out.print(policy_table(policy, title))
        else:
            stood = {n: standing(settings, n).values for n in names}
            out.print(policies_table(stood, {n: defined_in(settings, n) for n in names}))
        for entry in entries:
            for problem in entry["problems"]:
                out.print(plain(f"policy {entry['name']} cannot be used: {problem}"), markup=False)

    guarded(go)
