"""Showing a plan: a text table, HTML for notebooks, JSON-ready data; and the one byte formatter."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flax_warmstart._src import surgery

if TYPE_CHECKING:
  from flax_warmstart._src.rows import LeafPlan, WarmStartPlan

# Tables longer than this are grouped by top-level scope.
GROUP_ABOVE = 40
_COLUMNS = ("name", "action", "source", "shape", "dtype", "read", "sharding", "reason")


def human_bytes(n: int) -> str:
  """`1536` -> `'1.5 KiB'`.

  Examples:
    >>> human_bytes(3 * 2**30)
    '3.0 GiB'
  """
  size = float(n)
  for unit in ("B", "KiB", "MiB", "GiB"):
    if size < 1024 or unit == "GiB":
      return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
    size /= 1024
  raise AssertionError("unreachable")


def _cells(row: LeafPlan) -> tuple[str, ...]:
  dtype = str(row.dtype) if not row.cast else f"{row.source_dtype}->{row.dtype}"
  if row.kind not in ("array", "scalar"):  # a PRNG key (its key data's shape), a string, an object
    dtype = row.kind
  source = "" if row.source in (None, row.name) else row.source
  if row.expr is not None:  # a rule's transform: the chain, with the shape after each step
    source = row.expr.describe()
  read = human_bytes(row.nbytes) if row.nbytes else ""
  return (row.name, str(row.action), source, str(row.shape), dtype, read, row.sharding, row.reason)


def scope_of(row: LeafPlan) -> str:
  """The top-level scope a row is grouped under: `encoder` for `encoder/layer_0/kernel`."""
  return row.name.split("/", 1)[0] if "/" in row.name else "(root)"


def _groups(rows: Sequence[LeafPlan]) -> list[tuple[str | None, list[LeafPlan]]]:
  if len(rows) <= GROUP_ABOVE:
    return [(None, list(rows))]
  groups: dict[str, list[LeafPlan]] = {}
  for row in rows:
    groups.setdefault(scope_of(row), []).append(row)
  return list(groups.items())


def _counts(rows: Sequence[LeafPlan]) -> str:
  counts: dict[str, int] = {}
  for row in rows:
    counts[str(row.action)] = counts.get(str(row.action), 0) + 1
  return ", ".join(f"{n} {action}" for action, n in counts.items())


def table(plan: WarmStartPlan) -> str:
  """The plan as an aligned text table under its one-line summary; long tables group by scope."""
  body = [_cells(row) for row in plan.leaves]
  widths = [max(len(c) for c in column) for column in zip(_COLUMNS, *body, strict=True)]

  def line(cells: Sequence[str]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

  lines = [plan.summary(), line(_COLUMNS)]
  for scope, rows in _groups(plan.leaves):
    if scope is not None:
      lines.append(f"[{scope}] {len(rows)} leaves: {_counts(rows)}")
    lines += [line(_cells(row)) for row in rows]
  return "\n".join(lines + _unused_lines(plan) + [f"WARNING: {w}" for w in plan.warnings])


def _unused_lines(plan: WarmStartPlan) -> list[str]:
  """`Unused in <checkpoint>: a, b, ... and N more`, when any checkpoint tensor goes unread."""
  unused = plan.unused_tensors()
  if not any(unused.values()):
    return []
  lines = []
  for where, names in unused.items():
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "") if names else "none"
    lines.append(f"Unused in {where}: {shown}")
  return lines


def to_html(plan: WarmStartPlan) -> str:
  """The plan as an HTML table (for notebooks); long tables group by scope."""
  esc = html.escape
  parts = [
    '<table class="flax-warmstart-plan">',
    f"<caption>{esc(plan.summary())}</caption>",
    "<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in _COLUMNS) + "</tr></thead>",
  ]
  for scope, rows in _groups(plan.leaves):
    parts.append("<tbody>")
    if scope is not None:
      parts.append(
        f'<tr class="scope"><th colspan="{len(_COLUMNS)}">{esc(scope)}: {len(rows)} leaves, {esc(_counts(rows))}</th></tr>'
      )
    for row in rows:
      parts.append(
        f'<tr class="{esc(str(row.action))}">' + "".join(f"<td>{esc(c)}</td>" for c in _cells(row)) + "</tr>"
      )
    parts.append("</tbody>")
  parts.append("</table>")
  parts += [f'<p class="unused">{esc(line)}</p>' for line in _unused_lines(plan)]
  parts += [f'<p class="warning">WARNING: {esc(w)}</p>' for w in plan.warnings]
  return "".join(parts)


def _row_dict(plan: WarmStartPlan, row: LeafPlan) -> dict[str, Any]:
  index = {id(c): k for k, c in enumerate(plan.checkpoints)}
  out = {
    "name": row.name,
    "action": str(row.action),
    "reason": row.reason,
    "code": str(row.code),
    "reset": None if row.reset is None else str(row.reset),
    "source": row.source,
    "renamed_by": row.renamed_by,
    "transforms": [t.describe() for t in row.transforms],
    "chain": row.chain(),
    "inputs": list(row.inputs),
    "checkpoint": None if row.checkpoint is None else index[id(row.checkpoint)],
    "shape": list(row.shape),
    "dtype": str(row.dtype),
    "kind": row.kind,
    "source_shape": None if row.source_shape is None else list(row.source_shape),
    "source_dtype": None if row.source_dtype is None else str(row.source_dtype),
    "cast": row.cast,
    "sharding": row.sharding,
    "bytes": row.nbytes,
  }
  if row.remap is not None:
    out["vocab"] = {"axis": row.remap.info.axis, "follows": row.remap.follows, **row.remap.mapping.stats()}
  return out


def _source_dict(source: Any) -> Any:
  if hasattr(source, "to_dict"):
    return source.to_dict()
  pairs = list(source.items()) if isinstance(source, dict) else list(source)
  if isinstance(source, dict) and not any(surgery.is_transform(k) for k in source):
    return {"assignment_map": dict(source)}
  return {"assignment_map": [[surgery.to_data(a), b] for a, b in pairs]}


def to_dict(plan: WarmStartPlan) -> dict[str, Any]:
  """The plan as JSON-ready data: summary, checkpoints, one dict per leaf, unused tensors."""
  return {
    "summary": plan.summary(),
    "checkpoints": [
      {"location": c.requested, "path": c.location, "format": c.format, "step": c.step} for c in plan.checkpoints
    ],
    "sources": [_source_dict(s) for s in plan.sources],
    "bytes": plan.nbytes,
    "leaves": [_row_dict(plan, row) for row in plan.leaves],
    "unused": plan.unused_tensors(),
    "warnings": list(plan.warnings),
  }
