"""Drills on training runs: resume restores the run's own config and writes nothing before its checkpoint
loads; damaged checkpoints are messages; kill -9 then resume ends as an uninterrupted run; a full disk during a
checkpoint write keeps the previous one; a non-finite loss stops naming the step."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

LAST = Path("checkpoints") / "last.ckpt"


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def error_line(output: str) -> str:
    (line,) = [x for x in output.splitlines() if x.startswith("error: ")]
    return line


def test_resume_takes_the_runs_own_config_and_only_what_the_line_changes(drill_world, script):
    """`rag-train run_dir=<run> ckpt_path=last` used to recompose the defaults (the world data set, MiniLM)
    instead of the run's own config; now it goes on with the run's data and models for one more epoch."""
    run = drill_world.run
    done = script(drill_world.root, "rag-train", f"run_dir={run}", "ckpt_path=last", "trainer.max_epochs=2",
                  "export=false", timeout=240)
    assert done.code == 0 and "Traceback" not in done.output, done.output[-3000:]
    assert torch.load(run / LAST, map_location="cpu", weights_only=True)["global_step"] == 4  # 2 steps per epoch
    resolved = yaml.safe_load((run / "config_resolved.yaml").read_text())
    assert resolved["experiment_name"] == "tiny" and resolved["trainer"]["max_epochs"] == 2
    assert resolved["data"]["corpus_file"] == str(drill_world.root / "data" / "corpus.jsonl")


def test_a_truncated_last_checkpoint_stops_the_resume_before_anything_is_written(drill_world, script, files_of):
    run = drill_world.run
    truncate(run / LAST, 20_000)
    before = files_of(run)
    done = script(drill_world.root, "rag-train", f"run_dir={run}", "ckpt_path=last")
    assert done.code == 2 and "Traceback" not in done.output, done.output[-3000:]
    message = error_line(done.err)
    assert str(run / LAST) in message and "truncated or corrupt" in message and "step000002" in message
    assert files_of(run) == before  # .hydra/, config_resolved.yaml, train.log, checkpoints: all as they were


def test_a_resume_whose_checkpoint_does_not_fit_leaves_the_run_record_intact(drill_world, script, files_of, tmp_path):
    """A model override on the resume line: a message naming the weights, and the run's record as it was, so
    rag-eval of its checkpoints still works (the failed resume used to rewrite config_resolved.yaml and
    .hydra/ first)."""
    run = drill_world.run
    before = files_of(run, skip=("train.log",))
    done = script(drill_world.root, "rag-train", f"run_dir={run}", "ckpt_path=last",
                  "model.generator.config.d_model=64")
    assert done.code == 2 and "Traceback" not in done.output, done.output[-3000:]
    assert "does not fit the model" in done.err and "(300, 32) in the checkpoint, (300, 64) in the model" in done.err
    assert files_of(run, skip=("train.log",)) == before
    evaluated = script(drill_world.root, "rag-eval", f"ckpt_path={run / LAST}", "accelerator=cpu",
                       f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluated.code == 0, evaluated.output[-3000:]


@pytest.mark.parametrize("stage", ["rag-eval", "rag-predict"])
def test_a_truncated_checkpoint_is_a_message(drill_world, script, tmp_path, stage):
    ckpt = drill_world.run / LAST
    truncate(ckpt, 20_000)
    extra = ["question=What is the capital of Florin?"] if stage == "rag-predict" else []
    done = script(drill_world.root, stage, f"ckpt_path={ckpt}", "accelerator=cpu", *extra,
                  f"hydra.run.dir={tmp_path / 'out'}")
    assert done.code == 2 and "Traceback" not in done.output, done.output[-3000:]
    message = error_line(done.err)
    assert str(ckpt) in message and "truncated or corrupt" in message and "step000002" in message


@pytest.mark.slow  # 53 s in CI; covered faster by test_pipeline.py's resume-equals-uninterrupted test and the DDP kill drill below
def test_kill_9_during_training_then_resume_ends_as_an_uninterrupted_run(drill_world, script, start, tmp_path):
    """One batch of all 8 questions per epoch, question encoder frozen (no random state enters): a run killed
    with SIGKILL after a checkpoint, resumed with `run_dir=... ckpt_path=last`, continues at the saved step and
    ends with the weights and optimizer state of a run that went through."""
    common = [*drill_world.overrides, "loader.global_batch_size=8", "model.freeze_question_encoder=true", "test=false",
              "export=false", "trainer.max_epochs=12"]
    whole = script(drill_world.root, "rag-train", *common, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.code == 0, whole.output[-3000:]
    killed = tmp_path / "killed"
    proc = start(drill_world.root, "rag-train", *common, f"hydra.run.dir={killed}")
    saved_step = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (killed / LAST).is_file():  # written atomically: a complete checkpoint or none
            saved_step = torch.load(killed / LAST, map_location="cpu", weights_only=True)["global_step"]
            if saved_step >= 2:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert saved_step is not None and 2 <= saved_step < 12
    resumed = script(drill_world.root, "rag-train", f"run_dir={killed}", "ckpt_path=last")
    assert resumed.code == 0 and "Traceback" not in resumed.output, resumed.output[-3000:]
    a, b = (torch.load(d / LAST, map_location="cpu", weights_only=True) for d in (tmp_path / "whole", killed))
    assert a["global_step"] == b["global_step"] == 12
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for w, r in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True):
        assert int(w["step"]) == int(r["step"])
        torch.testing.assert_close(r["exp_avg"], w["exp_avg"], rtol=1e-5, atol=1e-8)


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_checkpoint(drill_world, script, stray_temporaries):
    """Files capped at half a checkpoint (RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk): Lightning alone
    truncates last.ckpt and dies with a traceback; now the previous checkpoints stay byte for byte, the message
    names the directory, and no temporary file is left."""
    run = drill_world.run
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.ckpt")}
    cap = (run / LAST).stat().st_size // 2
    done = script(drill_world.root, "rag-train", f"run_dir={run}", "ckpt_path=last", "trainer.max_epochs=2",
                  "export=false", max_file_bytes=cap)
    assert done.code == 2 and "Traceback" not in done.output, done.output[-3000:]
    message = error_line(done.err)
    assert "File too large" in message and str(run / "checkpoints") in message and "ckpt_path=last" in message
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.ckpt")} == before
    assert not stray_temporaries(run)


def test_a_non_finite_loss_stops_training_naming_the_step(drill_world, script, tmp_path):
    """lr=1e6 blows the gradients up at the second step: training used to go on to nan losses and exit 0."""
    out = tmp_path / "run"
    done = script(drill_world.root, "rag-train", *drill_world.overrides, "model.optim.lr=1e6",
                  "trainer.gradient_clip_val=null", f"hydra.run.dir={out}")
    assert done.code == 2 and "Traceback" not in done.output, done.output[-3000:]
    assert "at step 1 (epoch 0" in error_line(done.err) and "model.optim.lr" in error_line(done.err)
    assert not list(out.rglob("*.ckpt"))  # nothing with broken weights was saved


def test_a_nan_weight_in_a_resumed_checkpoint_stops_at_that_step_and_keeps_the_checkpoints(drill_world, script,
                                                                                           files_of):
    run = drill_world.run
    ckpt = torch.load(run / LAST, map_location="cpu", weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.startswith("generator.") and k.endswith("weight"))
    ckpt["state_dict"][name].view(-1)[0] = float("nan")
    poisoned = drill_world.root / "poisoned" / "checkpoints" / "poisoned.ckpt"
    poisoned.parent.mkdir(parents=True)
    torch.save(ckpt, poisoned)
    before = files_of(run / "checkpoints")
    done = script(drill_world.root, "rag-train", f"run_dir={run}", f"ckpt_path={poisoned}", "trainer.max_epochs=2")
    assert done.code == 2 and "Traceback" not in done.output, done.output[-3000:]
    assert "is nan at step 2" in error_line(done.err) or "not finite at step 2" in error_line(done.err)
    assert files_of(run / "checkpoints") == before


RANK_LOST_TIMEOUT_S = 60  # the stated bound: a DDP job whose other rank died stops within this


def test_a_ddp_job_whose_rank_is_killed_stops_with_a_message_and_resumes(drill_world, script, start, tmp_path):
    """Two gloo processes (`trainer=ddp_cpu`); rank 1 killed with SIGKILL after the first checkpoint: the job
    stops within RANK_LOST_TIMEOUT_S (Lightning's watch looks every 5 s, unless rank 0 sees its peer gone in a
    collective first: the same message either way) with exit status 2 and a message naming the resume command (it used to be SIGKILLed silently, or die with gloo's traceback), and the run resumes from
    its last checkpoint."""
    import os
    import subprocess

    run, output = tmp_path / "ddp", tmp_path / "ddp.out"
    proc = start(drill_world.root, "rag-train", *drill_world.overrides, "trainer=ddp_cpu", "trainer.max_epochs=100",
                 "logger=csv", "test=false", "export=false", f"run_dir={run}", output=output)
    rank1 = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / LAST).is_file():  # rank 1 is rank 0's child (Lightning's subprocess launcher)
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if children:
                rank1 = int(children[0])
                break
        time.sleep(0.2)
    assert rank1 is not None, "rank 1 never started, or the job ended first"
    os.kill(rank1, signal.SIGKILL)
    killed_at = time.time()
    code = proc.wait(timeout=RANK_LOST_TIMEOUT_S + 30)
    assert time.time() - killed_at < RANK_LOST_TIMEOUT_S
    text = output.read_text()
    assert code == 2 and "Traceback" not in text, text[-3000:]
    assert "a DDP process of this job stopped" in error_line(text) and f"run_dir={run} ckpt_path=last" in text
    saved = torch.load(run / LAST, map_location="cpu", weights_only=True)["global_step"]
    resumed = script(drill_world.root, "rag-train", f"run_dir={run}", "ckpt_path=last",
                     f"trainer.max_epochs={saved // 2 + 1}", timeout=240)
    assert resumed.code == 0 and "Traceback" not in resumed.output, resumed.output[-3000:]
    assert torch.load(run / LAST, map_location="cpu", weights_only=True)["global_step"] == saved + 2
