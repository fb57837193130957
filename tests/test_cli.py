"""The `flax-warmstart` command line (flax_warmstart/cli.py).

Most tests call `cli.main(argv)` in this process (`conftest.run_cli`: it
returns the exit code; stdout and stderr are captured). One smoke test starts
a real `python -m flax_warmstart.cli run` subprocess, from relative paths (the
`warm` fixture, whose output three tests check). OLD is a CheckpointManager
root (the session's Adam-trained MLP TrainState at step 2, `adam_mlp_run`),
NEW a checkpoint of a changed model (the `encoder` scope renamed `backbone`, a
wider `head`), plus a small vocabulary case. Exit codes: 0 success, 1 a request
that cannot be carried out (one `flax-warmstart: error:` message, never a
traceback), 2 a usage error.
"""

import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import MLP, make_state, run_cli, save_checkpoint

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
ERROR = "flax-warmstart: error:"

ENCODER = ["encoder/kernel", "encoder/bias"]
HEAD = ["head/kernel", "head/bias"]
SLOTS = ["", "/opt_state/0/mu", "/opt_state/0/nu"]
# The OLD checkpoint's names (the naming contract), shapes and dtypes.
OLD_VARS = {
  **{p + s: ((3, 4) if p.endswith("kernel") else (4,), "float32") for p in ENCODER for s in SLOTS},
  **{p + s: ((4, 2) if p.endswith("kernel") else (2,), "float32") for p in HEAD for s in SLOTS},
  "opt_state/0/count": ((), "int32"),
}
BACKBONE_NAMES = [p.replace("encoder", "backbone") + s for p in ENCODER for s in SLOTS]
HEAD_NAMES = [p + s for p in HEAD for s in SLOTS]
ENCODER_NAMES = [p + s for p in ENCODER for s in SLOTS]

RENAME_YAML = """\
# Warm-start everything; the encoder was renamed backbone, the head changed shape.
vars_to_warm_start: [".*"]
rename_rules:
  - ['backbone/(.*)', 'encoder/\\1']
  - ['head/.*', null]
"""
RENAME_JSON = {"vars_to_warm_start": [".*"], "rename_rules": [["backbone/(.*)", "encoder/\\1"], ["head/.*", None]]}

OLD_VOCAB = ["a", "b", "c"]
NEW_VOCAB = ["c", "z", "a", "b"]  # z is new: its row comes from the backup initializer.


def cli(*args, cwd=None):
  """Runs `flax-warmstart ARGS` in this process: `(returncode, stdout, stderr)`."""
  return run_cli(*args, cwd=cwd)


def cli_subprocess(*args, cwd=None):
  """Runs `flax-warmstart ARGS` in a fresh interpreter (`python -m flax_warmstart.cli`)."""
  return subprocess.run(
    [sys.executable, "-m", "flax_warmstart.cli", *map(str, args)],
    capture_output=True,
    text=True,
    timeout=120,
    env=ENV,
    cwd=cwd,
  )


def assert_ok(result):
  assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
  assert "Traceback" not in result.stderr, result.stderr


def assert_user_error(result, *fragments):
  """Exit 1, one `flax-warmstart: error:` message naming `fragments`, no traceback, nothing on stdout."""
  assert "Traceback" not in result.stderr, result.stderr
  assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
  assert result.stderr.startswith(ERROR), result.stderr
  assert result.stdout == "", result.stdout
  for fragment in fragments:
    assert fragment in result.stderr, (fragment, result.stderr)


def table_rows(text):
  """The rows of a printed table under its `name ...` header, as `{name: cells}`."""
  lines = text.splitlines()
  start = next(k for k, line in enumerate(lines) if line.split()[:1] == ["name"])
  rows = {}
  for line in lines[start + 1 :]:
    if not line.strip() or line.startswith(("Unused", "[")):
      continue
    cells = line.split()
    rows[cells[0]] = cells[1:]
  return rows


def restore(path):
  """A checkpoint written by the CLI, read back with plain Orbax (host arrays)."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.fspath(path))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, adam_mlp_run):
  root = tmp_path_factory.mktemp("cli")
  old_state, old = adam_mlp_run  # read-only: shared by the session
  new_state = make_state(MLP(encoder_name="backbone", outputs=3), seed=1, steps=1)
  new = save_checkpoint(root / "new", new_state)
  (root / "rename.yaml").write_text(RENAME_YAML)
  (root / "rename.json").write_text(json.dumps(RENAME_JSON))

  # Vocabulary: a bare params dict whose embedding rows follow a vocabulary file.
  (root / "old_vocab.txt").write_text("\n".join(OLD_VOCAB) + "\n")
  (root / "new_vocab.txt").write_text("\n".join(NEW_VOCAB) + "\n")
  old_table = np.arange(6, dtype=np.float32).reshape(3, 2)
  vold = save_checkpoint(root / "vold", {"params": {"embedder": {"embedding": old_table}}})
  vnew = save_checkpoint(root / "vnew", {"params": {"embedder": {"embedding": np.full((4, 2), -1, np.float32)}}})
  vocab_settings = {
    "var_name_to_vocab_info": {
      "embedder/embedding": {
        "new_vocab": str(root / "new_vocab.txt"),
        "new_vocab_size": len(NEW_VOCAB),
        "num_oov_buckets": 0,
        "old_vocab": str(root / "old_vocab.txt"),
        "backup_initializer": {"constant": 0.5},
      }
    }
  }
  (root / "vocab.json").write_text(json.dumps(vocab_settings))
  return types.SimpleNamespace(
    root=root,
    old=old,
    new=new,
    old_state=old_state,
    new_state=new_state,
    yaml=root / "rename.yaml",
    json=root / "rename.json",
    vold=vold,
    vnew=vnew,
    vocab_json=root / "vocab.json",
    old_table=old_table,
  )


# --help and usage errors.


@pytest.mark.parametrize("verb", [None, "inspect", "diff", "plan", "run"])
def test_help_shows_examples(verb):
  result = cli(*([verb] if verb else []), "--help")
  assert_ok(result)
  out = result.stdout
  assert out.startswith("usage: flax-warmstart"), out
  for example in ("flax-warmstart inspect", "flax-warmstart diff", "flax-warmstart plan", "flax-warmstart run"):
    assert example in out, (example, out)
  options = {
    None: ["inspect", "diff", "plan", "run", "-v"],
    "inspect": ["CKPT", "--filter", "--item", "--json"],
    "diff": ["OLD", "NEW", "--json"],
    "plan": ["OLD", "NEW", "--settings", "--json"],
    "run": ["OLD", "NEW", "OUT", "--settings", "--force", "--no-progress", "--json"],
  }[verb]
  for option in options:
    assert option in out, (option, out)


def test_usage_errors_exit_2(ckpts):
  result = cli("plan", ckpts.old)  # NEW is missing
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert "usage:" in result.stderr and "Traceback" not in result.stderr, result.stderr


# inspect


def test_inspect_manager_root_lists_names_shapes_dtypes_bytes_and_step(ckpts):
  result = cli("inspect", ckpts.old)
  assert_ok(result)
  header = result.stdout.splitlines()[0]
  assert "@step 2" in header, header
  assert f"{len(OLD_VARS) + 1} variables" in header, header  # + step
  total = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in OLD_VARS.values())
  assert f"{total + 8} B" in header or f"{total + 4} B" in header, header  # the step is an int64 or int32
  rows = table_rows(result.stdout)
  assert set(rows) == {*OLD_VARS, "step"}, sorted(rows)
  for name, (shape, dtype) in OLD_VARS.items():
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    line = next(line for line in result.stdout.splitlines() if line.split()[:1] == [name])
    assert re.search(rf"^{re.escape(name)}\s+{re.escape(str(shape))}\s+{dtype}\s+{nbytes} B$", line), line
  assert rows["step"][-3].startswith("int"), rows["step"]


def test_inspect_filter_restricts_the_rows(ckpts):
  result = cli("inspect", ckpts.old, "--filter", "^head/")
  assert_ok(result)
  assert set(table_rows(result.stdout)) == set(HEAD_NAMES), result.stdout
  assert "6 variables" in result.stdout.splitlines()[0], result.stdout


def test_inspect_json(ckpts):
  result = cli("inspect", ckpts.old, "--json")
  assert_ok(result)
  info = json.loads(result.stdout)
  assert info["step"] == 2
  assert info["checkpoint"] == ckpts.old
  got = {v["name"]: (tuple(v["shape"]), v["dtype"]) for v in info["variables"]}
  assert {k: v for k, v in got.items() if k != "step"} == OLD_VARS
  assert got["step"][0] == () and got["step"][1].startswith("int"), got["step"]
  for v in info["variables"]:
    assert v["bytes"] == int(np.prod(v["shape"])) * np.dtype(v["dtype"]).itemsize, v
  assert info["bytes"] == sum(v["bytes"] for v in info["variables"])
  assert [v["name"] for v in info["variables"]] == sorted(got)


def test_inspect_missing_path_is_a_user_error(ckpts):
  missing = ckpts.root / "no_such_checkpoint"
  assert_user_error(cli("inspect", missing), str(missing), "does not exist")


def test_inspect_invalid_filter_regex_is_a_user_error(ckpts):
  assert_user_error(cli("inspect", ckpts.old, "--filter", "encoder/(kernel"))


# diff


def test_diff_text(ckpts):
  result = cli("diff", ckpts.old, ckpts.new)
  assert_ok(result)
  out = result.stdout
  assert "2 names match in shape and dtype" in out, out  # opt_state/0/count and step
  assert "shape differs: head/kernel: (4, 2) -> (4, 3)" in out, out
  assert "shape differs: head/bias: (2,) -> (3,)" in out, out
  for name in ENCODER_NAMES:
    assert re.search(rf"only in OLD:\s+{re.escape(name)} \(", out), (name, out)
  for name in BACKBONE_NAMES:
    assert re.search(rf"only in NEW:\s+{re.escape(name)} \(", out), (name, out)
  assert re.search(r"only in NEW:\s+backbone/kernel \(3, 4\) \(closest in OLD: encoder/kernel\b", out), out
  assert re.search(r"only in NEW:\s+backbone/bias \(4,\) \(closest in OLD: encoder/bias\b", out), out
  assert "dtype differs" not in out


def test_diff_json(ckpts):
  result = cli("diff", ckpts.old, ckpts.new, "--json")
  assert_ok(result)
  d = json.loads(result.stdout)
  assert set(d) == {"same", "shape", "dtype", "only_old", "only_new"}, d
  assert sorted(d["same"]) == ["opt_state/0/count", "step"]
  assert d["dtype"] == []
  shapes = {e["name"]: (tuple(e["old"]), tuple(e["new"])) for e in d["shape"]}
  assert set(shapes) == set(HEAD_NAMES)
  assert shapes["head/kernel"] == ((4, 2), (4, 3)) and shapes["head/bias"] == ((2,), (3,))
  assert {e["name"]: tuple(e["shape"]) for e in d["only_old"]} == {n: OLD_VARS[n][0] for n in ENCODER_NAMES}
  only_new = {e["name"]: e for e in d["only_new"]}
  assert set(only_new) == set(BACKBONE_NAMES)
  assert tuple(only_new["backbone/kernel"]["shape"]) == (3, 4)
  for name in BACKBONE_NAMES:
    assert only_new[name]["closest_old"][0] == name.replace("backbone", "encoder"), only_new[name]


# plan


def check_rename_leaves(leaves):
  """The plan of RENAME_YAML: backbone/* copied from encoder/*, head/* kept, the rest copied."""
  assert set(leaves) == {*BACKBONE_NAMES, *HEAD_NAMES, "opt_state/0/count", "step"}, sorted(leaves)
  for name in BACKBONE_NAMES:
    assert leaves[name]["action"] == "load", leaves[name]
    assert leaves[name]["source"] == name.replace("backbone", "encoder"), leaves[name]
  for name in HEAD_NAMES:
    assert leaves[name]["action"] == "keep", leaves[name]
    assert leaves[name]["source"] is None, leaves[name]
  for name in ("opt_state/0/count", "step"):
    assert leaves[name]["action"] == "load", leaves[name]
    assert leaves[name]["source"] == name, leaves[name]


def test_plan_yaml_settings_table(ckpts):
  result = cli("plan", ckpts.old, ckpts.new, "--settings", ckpts.yaml)
  assert_ok(result)
  out = result.stdout
  assert out.startswith(f"8 of 14 leaves from {ckpts.old}@step 2"), out
  rows = table_rows(out)
  for name in BACKBONE_NAMES:
    assert rows[name][:2] == ["load", name.replace("backbone", "encoder")], (name, rows[name])
  for name in HEAD_NAMES:
    assert rows[name][0] == "keep", (name, rows[name])
  assert rows["step"][0] == "load" and rows["opt_state/0/count"][0] == "load", out
  assert re.search(r"Unused in .*head/kernel", out), out  # OLD's head is read by nothing


def test_plan_yaml_settings_json(ckpts):
  result = cli("plan", ckpts.old, ckpts.new, "--settings", ckpts.yaml, "--json")
  assert_ok(result)
  plan = json.loads(result.stdout)
  check_rename_leaves({leaf["name"]: leaf for leaf in plan["leaves"]})
  assert plan["checkpoints"][0]["step"] == 2
  (source,) = plan["sources"]
  assert source["rename_rules"] == [["backbone/(.*)", "encoder/\\1"], ["head/.*", None]]
  assert source["vars_to_warm_start"] == [".*"]
  assert source["ckpt_to_initialize_from"] == ckpts.old  # OLD, since the file names no checkpoint


def test_plan_json_settings_file(ckpts):
  result = cli("plan", ckpts.old, ckpts.new, "--settings", ckpts.json, "--json")
  assert_ok(result)
  check_rename_leaves({leaf["name"]: leaf for leaf in json.loads(result.stdout)["leaves"]})


BAD_SETTINGS = {
  # name: (file name, content or None for no file, fragments the message must hold)
  "missing": ("missing.yaml", None, ["missing.yaml", "does not exist"]),
  "invalid_json": ("bad.json", '{"vars_to_warm_start": [".*"],', ["bad.json", "not valid JSON"]),
  "invalid_yaml": ("bad.yaml", "rename_rules: [\n  - a\n", ["bad.yaml", "not valid YAML"]),
  "yaml_list": ("list.yaml", "- vars_to_warm_start\n- step\n", ["list.yaml", "mapping", "list"]),
  "unknown_field": ("unknown.yaml", 'vars_to_warm_strat: [".*"]\n', ["'vars_to_warm_strat'", "'vars_to_warm_start'"]),
  "bad_value": ("badval.yaml", "step: sometimes\n", ["step", "sometimes", "reset"]),
  # Beyond the obvious: malformed files must not crash either.
  "not_utf8": ("latin1.yaml", b"step: r\xe9set\n", ["latin1.yaml"]),
  "rename_rules_not_a_list": ("rules.yaml", "rename_rules: 5\n", ["rename_rules"]),
  "vocab_info_not_a_mapping": ("vocab.yaml", "var_name_to_vocab_info: {backbone/kernel: 5}\n", ["backbone/kernel"]),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_plan_bad_settings_file_is_a_user_error(ckpts, tmp_path, case):
  filename, content, fragments = BAD_SETTINGS[case]
  path = tmp_path / filename
  if isinstance(content, bytes):
    path.write_bytes(content)
  elif content is not None:
    path.write_text(content)
  assert_user_error(cli("plan", ckpts.old, ckpts.new, "--settings", path), *fragments)


def test_plan_that_cannot_be_carried_out_names_the_missing_tensor(ckpts):
  # Default settings: NEW's backbone/* are not in OLD, and the head changed shape.
  result = cli("plan", ckpts.old, ckpts.new)
  assert_user_error(result, "Cannot warm-start", "'backbone/kernel'", "'backbone/bias'", "no tensor", "head/kernel")


def test_optimizer_reset_is_refused_offline_before_reading(ckpts, tmp_path):
  settings = tmp_path / "reset.yaml"
  settings.write_text("optimizer_state: reset\n")
  result = cli("run", ckpts.old, ckpts.new, str(tmp_path / "out"), "--settings", str(settings))
  assert_user_error(result, "optimizer_state='reset'", "optimizer_state='keep'")
  assert not (tmp_path / "out").exists()


# run


@pytest.fixture(scope="module")
def warm(ckpts):
  """`run` with the rename settings, with paths relative to NEW's directory: a real subprocess (smoke test)."""
  old = os.path.relpath(ckpts.old, ckpts.root)
  result = cli_subprocess("run", old, "new", "warm", "--settings", "rename.yaml", "--no-progress", cwd=ckpts.root)
  return types.SimpleNamespace(result=result, out=ckpts.root / "warm", old=old)


def check_warm_checkpoint(path, ckpts):
  """OUT holds NEW's structure: backbone/* from OLD's encoder/*, head/* from NEW, OLD's step and count."""
  out = restore(path)
  old, new = ckpts.old_state, ckpts.new_state
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(out["params"]["backbone"][leaf], old.params["encoder"][leaf])
    np.testing.assert_array_equal(out["params"]["head"][leaf], new.params["head"][leaf])
    for slot in ("mu", "nu"):
      got = out["opt_state"][0][slot]
      np.testing.assert_array_equal(got["backbone"][leaf], getattr(old.opt_state[0], slot)["encoder"][leaf])
      np.testing.assert_array_equal(got["head"][leaf], getattr(new.opt_state[0], slot)["head"][leaf])
  assert int(out["step"]) == 2
  assert int(out["opt_state"][0]["count"]) == int(old.opt_state[0].count) == 2


def test_run_in_a_subprocess_writes_the_warm_started_checkpoint(warm, ckpts):
  assert_ok(warm.result)
  assert warm.result.stdout.startswith(f"Wrote warm: 8 of 14 leaves from {warm.old}@step 2"), warm.result.stdout
  check_warm_checkpoint(warm.out, ckpts)


def test_run_refuses_an_existing_out(warm, ckpts):
  assert_ok(warm.result)
  before = sorted(os.listdir(warm.out))
  result = cli("run", ckpts.old, ckpts.new, warm.out, "--settings", ckpts.yaml)
  assert_user_error(result, str(warm.out), "--force")
  assert sorted(os.listdir(warm.out)) == before


def test_run_force_overwrites(ckpts, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "stale.txt").write_text("from an earlier run")
  result = cli("run", ckpts.old, ckpts.new, out, "--settings", ckpts.json, "--force", "--no-progress", "--json")
  assert_ok(result)
  summary = json.loads(result.stdout)
  assert summary["out"] == str(out)
  assert summary["summary"].startswith("8 of 14 leaves"), summary
  assert not (out / "stale.txt").exists()
  check_warm_checkpoint(out, ckpts)


def test_run_output_can_be_inspected(warm):
  assert_ok(warm.result)
  result = cli("inspect", warm.out, "--json")
  assert_ok(result)
  got = {v["name"]: tuple(v["shape"]) for v in json.loads(result.stdout)["variables"]}
  assert got["backbone/kernel"] == (3, 4) and got["head/kernel"] == (4, 3), got
  assert set(got) == {*BACKBONE_NAMES, *HEAD_NAMES, "opt_state/0/count", "step"}, sorted(got)


def test_verbose_logs_the_warm_start(ckpts, tmp_path):
  result = cli("-v", "run", ckpts.old, ckpts.new, tmp_path / "out", "--settings", ckpts.yaml, "--no-progress")
  assert_ok(result)
  assert re.search(r"INFO flax_warmstart: Warm-started 8 of 14 leaves", result.stderr), result.stderr


# Vocabulary remap through a settings file.


def test_vocab_plan_json(ckpts):
  result = cli("plan", ckpts.vold, ckpts.vnew, "--settings", ckpts.vocab_json, "--json")
  assert_ok(result)
  (leaf,) = json.loads(result.stdout)["leaves"]
  assert leaf["name"] == "embedder/embedding" and leaf["action"] == "load", leaf
  assert leaf["source_shape"] == [3, 2] and leaf["shape"] == [4, 2], leaf
  assert leaf["vocab"]["copied"] == 3 and leaf["vocab"]["new"] == 1 and leaf["vocab"]["oov"] == 0, leaf


def test_vocab_run(ckpts, tmp_path):
  out = tmp_path / "vout"
  result = cli("run", ckpts.vold, ckpts.vnew, out, "--settings", ckpts.vocab_json, "--no-progress")
  assert_ok(result)
  table = restore(out)["params"]["embedder"]["embedding"]
  rows = {tok: ckpts.old_table[OLD_VOCAB.index(tok)] for tok in OLD_VOCAB}
  expected = np.stack([rows.get(tok, np.full(2, 0.5, np.float32)) for tok in NEW_VOCAB])
  np.testing.assert_array_equal(table, expected)
