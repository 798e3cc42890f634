"""The protocol's one door: a technique defined only in this file, registered by adding it to ``TECHNIQUE_TYPES``,
trains, logs, checkpoints and resumes through the recipe without a line of the trainer knowing it.

The toy technique adds an extra loss term with a count of its own (the records of the step), a logged sum, a flag,
and a state that changes every step (the term's scale decays), so a resume that lost the state would not be
bit-identical. Oracles: the uninterrupted run (resume), the run without the technique (the term is in the gradient),
the checkpoint's own contents, and the epoch figure recomputed by hand from the step lines.

    .venv/bin/python -m pytest tests/test_technique_protocol.py -q
"""

from __future__ import annotations

import inspect

import pytest

from recipe_harness.common import final_weights, history, identical, metrics, parse
from recipe_harness.fixtures import env, one_thread  # noqa: F401 (pytest fixtures)
import src.training.train_enhanced as te


class ToyTechnique(te.Technique):
    """A squared-activation penalty: ``scale x weight x sum over records of mean(hidden)^2``, divided by the
    records of the whole step; ``scale`` starts at 1 and is multiplied by ``--toy_decay`` after every real step."""
    name = "toy"
    switch_help = "a toy extra loss term (tests only)"
    logged_sums = (te.LoggedSum("toy", "toy_records", "train_toy"),)

    @staticmethod
    def add_flags(group) -> None:
        group.add_argument("--toy_weight", type=float, default=0.1, help="weight of the toy term")
        group.add_argument("--toy_decay", type=float, default=0.9, help="the term's scale x this after each step")

    @staticmethod
    def check(args) -> list[str]:
        return [] if args.toy_weight >= 0 else ["--toy_weight must be >= 0"]

    def configure(self, run) -> None:
        self.scale, self.updates = 1.0, 0

    def summary(self, run) -> str:
        return f"toy term: weight {self.args.toy_weight}, decay {self.args.toy_decay}"

    def state_dict(self) -> dict:
        return {"scale": self.scale, "updates": self.updates}

    def load_state_dict(self, state, run) -> None:
        self.scale, self.updates = state["scale"], state["updates"]

    def step_counts(self, window) -> dict[str, float]:
        return {"toy_records": float(sum(b["input_ids"].shape[0] for b in window))}

    def micro_batch(self, batch, lm_out) -> te.StepPart:
        per_record = lm_out["hidden"].float().mean(dim=(1, 2)) ** 2  # (B,)
        term = self.scale * per_record.sum()
        return te.StepPart(loss_sum=term, weight=self.args.toy_weight, count="toy_records",
                           sums={"toy": term.detach()})

    def after_update(self, run) -> None:
        self.scale *= self.args.toy_decay
        self.updates += 1


@pytest.fixture
def toy(monkeypatch):
    """ToyTechnique registered the way every technique is: an entry in TECHNIQUE_TYPES (read when the parser is
    built and when a run is set up)."""
    monkeypatch.setattr(te, "TECHNIQUE_TYPES", [*te.TECHNIQUE_TYPES, ToyTechnique])
    return ToyTechnique


def argv(env: dict, out, *extra: str) -> list[str]:
    return ["--model_name", str(env["dropout"]), "--data_path", str(env["data"]), "--datasets_dir",
            str(env["datasets"]), "--output_dir", str(out), "--epochs", "2", "--batch_size", "4", "--learning_rate",
            "3e-3", "--max_length", "64", "--num_samples", "0", "--domain_eval_frequency", "0", "--seed", "3",
            "--device", "cpu", "--no_progress_bar", *extra]


TOY = ["--use_toy", "--toy_weight", "5.0", "--toy_decay", "0.95"]


def test_a_technique_defined_outside_the_trainer_trains_logs_checkpoints_and_resumes(env, tmp_path, toy):
    args = parse(argv(env, tmp_path / "full", *TOY), "the parser must pick up a registered technique's flags")
    assert (args.use_toy, args.toy_weight, args.toy_decay) == (True, 5.0, 0.95)
    full = te.train(args)
    assert full["exit_code"] == 0 and full["global_step"] == 20, full  # 2 epochs of 40 records / 4
    assert "toy term: weight 5.0, decay 0.95" in (tmp_path / "full" / "train.log").read_text()

    # logged: every step's line has the term (its sum over its own count), the epoch's entry the epoch's mean
    lines, hist = metrics(tmp_path / "full"), history(tmp_path / "full")
    assert all("toy" in line and line["toy"] > 0 for line in lines), lines[0]
    steps_of = [[x for x in lines if x["epoch"] == e + 1] for e in range(2)]
    for entry, steps in zip(hist, steps_of):  # every step holds 4 records: the epoch mean is the steps' mean
        assert entry["train_toy"] == pytest.approx(sum(x["toy"] for x in steps) / len(steps), rel=1e-9)

    # in the gradient: without the technique the weights end elsewhere
    te.train(parse(argv(env, tmp_path / "without")))
    assert identical(final_weights(tmp_path / "full"), final_weights(tmp_path / "without")), "the term did nothing"

    # checkpointed: the last checkpoint holds the state after all 20 updates
    found = te.find_resume_checkpoint(tmp_path / "full" / "checkpoints")
    assert found is not None
    assert found[1]["techniques"]["toy"] == {"scale": pytest.approx(0.95 ** 20), "updates": 20}

    # resumed mid-epoch 2: bit-identical to the uninterrupted run, the same figures
    resumed = argv(env, tmp_path / "resumed", *TOY, "--stop_after_step", "14")
    first = te.train(parse(resumed))
    assert (first["exit_code"], first["global_step"]) == (te.EXIT_INTERRUPTED, 14), first
    second = te.train(parse(resumed))
    assert second["exit_code"] == 0 and second["global_step"] == 20, second
    assert not identical(final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed"))
    assert [h["train_toy"] for h in history(tmp_path / "resumed")] == [h["train_toy"] for h in hist]
    assert [x["toy"] for x in metrics(tmp_path / "resumed")] == [x["toy"] for x in lines]


def test_a_registered_technique_is_switched_off_by_ablation_and_checked_by_name(toy, capsys):
    assert te.parse_args(["--use_toy", "--ablation_mode", "toy"]).use_toy is False
    with pytest.raises(SystemExit):
        te.parse_args(["--use_toy", "--toy_weight", "-1"])
    assert "--toy_weight must be >= 0" in capsys.readouterr().err


def test_the_recipe_names_no_technique():
    """The recipe's functions and the step's machinery name no technique (their code, docstrings aside): the
    techniques reach them only through the hooks."""
    names = [cls.name for cls in te.TECHNIQUE_TYPES] + ["CPUOffloadOptimizer"]
    recipe = [te.setup_run, te.optimizer_step, te.forward_backward, te.step_counts, te.log_and_checkpoint,
              te.log_step, te.add_epoch_sums, te.end_epoch, te.epoch_entry, te.build_train_sampler, te.summary_lines,
              te.sampling_in_effect, te.build_param_groups, te.build_optimizer, te.accumulate_gradients,
              te.TrainModule, te.LossSetup, te.StepResult, te.TrainingSampler, te._new_epoch_sums]
    for fn in recipe:
        source = inspect.getsource(fn)
        if fn.__doc__:
            source = source.replace(fn.__doc__, "")
        code = "\n".join(line.split("#")[0] for line in source.splitlines())
        mentioned = [n for n in names if f'"{n}"' in code or f".{n}" in code
                     or n == "CPUOffloadOptimizer" and n in code]
        assert not mentioned, f"{fn.__qualname__} names {mentioned}"
