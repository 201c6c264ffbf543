"""Sweeps through the real entry point (grid and Optuna, offline, CPU), the DDP multirun guard, SLURM configs."""

import gc
import json
import signal
import weakref
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftest import assert_one_line_error, run_cli
from hydra_plugins.lightning_ldm_sweeper.launch_check import check_multirun_devices
from hydra_plugins.lightning_ldm_sweeper.search_space import parse_search_space
from hydra_plugins.lightning_ldm_sweeper.trials import TrialOutcome, raise_if_all_failed
from lightning_ldm.cli import CONFIG_DIR, TrialFailure, exit_on_user_error, register_resolvers
from lightning_ldm.config.validate import validate_config
from lightning_ldm.errors import ConfigError, UserError
from wandb_offline import _records

TINY = ["stage=autoencoder", "trainer=cpu", "max_steps=2", "data.batch_size=4", "trainer.limit_val_batches=1",
        "trainer.val_check_interval=2"]


def _wandb_runs(trial_dir: Path) -> list[dict]:
    """The run record (id, group, tags, name) and exit code of each offline W&B run in a trial directory."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for log in sorted(trial_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = {}
        for raw in _records(log):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, group=record.run.run_group, tags=list(record.run.tags),
                           name=record.run.display_name)
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------- grid sweep

@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """Three trials, the middle one diverging (lr=1e30: a non-finite loss at batch 1), W&B offline."""
    cwd = tmp_path_factory.mktemp("grid")
    result = run_cli("-m", *TINY, "logger=wandb", "module.lr=1e-3,1e30,2e-3", cwd=cwd)
    sweeps = list(cwd.glob("outputs/autoencoder/multirun/*"))
    assert len(sweeps) == 1, (sweeps, result.stderr[-3000:])
    return result, sweeps[0]


def test_grid_sweep_goes_on_after_a_failed_trial_and_summarises(grid_sweep):
    result, sweep_dir = grid_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    trials = summary["trials"]
    assert summary["metric"] == "val/rec_loss"
    assert [(t["number"], t["status"], t["params"]) for t in trials] == [
        (0, "completed", {"module.lr": "0.001"}), (1, "failed", {"module.lr": "1e+30"}),
        (2, "completed", {"module.lr": "0.002"})]
    assert trials[1]["error"].startswith("NonFiniteLossError: generator loss is")
    # what a trial returns is its best monitored checkpoint metric
    best = torch.load(sweep_dir / "0" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    score = next(s["best_model_score"] for k, s in best["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert trials[0]["value"] == pytest.approx(float(score))
    assert "Sweep: 2 completed, 1 failed; values are the best val/rec_loss" in result.stdout
    assert "#1   failed" in result.stdout
    # the diverging trial says why in one line (a user error: no traceback), and trial 2 still ran after it
    assert "error: generator loss is" in result.stderr and "Traceback" not in result.stderr
    assert (sweep_dir / "2" / "checkpoints" / "last.ckpt").is_file()


def test_each_trial_has_its_own_directory_and_finished_wandb_run_grouped_by_sweep(grid_sweep):
    _, sweep_dir = grid_sweep
    runs = {n: _wandb_runs(sweep_dir / str(n)) for n in range(3)}
    assert all(len(r) == 1 for r in runs.values()), runs  # no trial logged into another's run
    runs = {n: r[0] for n, r in runs.items()}
    assert len({r["id"] for r in runs.values()}) == 3
    assert {r["group"].split("/")[-1] for r in runs.values()} == {sweep_dir.name}
    assert all(f"sweep:{sweep_dir.name}" in r["tags"] for r in runs.values())
    assert [r["name"].rsplit("/", 1)[-1] for r in runs.values()] == ["0", "1", "2"]
    assert [r["exit_code"] for r in runs.values()] == [0, 1, 0]  # each finished; the failed one as failed
    for n, lr in ((0, "0.001"), (2, "0.002")):
        assert f"module.lr={lr}" in json.loads((sweep_dir / str(n) / "run_info.json").read_text())["overrides"]


def test_a_sweep_where_every_trial_failed_ends_with_one_line_error():
    failed = TrialOutcome(0, "failed", None, "ValueError: x", {}, None)
    done = TrialOutcome(1, "completed", 0.5, None, {}, None)
    raise_if_all_failed([failed, done], Path("summary.json"))
    with pytest.raises(UserError, match="all 1 trials of the sweep failed"):
        raise_if_all_failed([failed], Path("summary.json"))


def test_a_failed_trial_keeps_no_frames_alive_and_finishes_its_wandb_run(monkeypatch):
    """Hydra keeps each trial's exception until the sweep ends: its frames (the trial's model) must not be."""
    finished = []
    monkeypatch.setattr("lightning_ldm.cli.finish_wandb_run", lambda failed: finished.append(failed))
    monkeypatch.setattr(HydraConfig.instance(), "cfg", OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN}}))

    class Model:
        pass

    def trial():
        model = Model()
        trial.model = weakref.ref(model)
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(TrialFailure, match="RuntimeError: CUDA out of memory") as info:
        with exit_on_user_error():
            trial()
    gc.collect()
    assert trial.model() is None and info.value.__context__.__traceback__ is None
    assert finished == [True]


# -------------------------------------------------------------------------------------------- Optuna sweep

def _study_trials(storage: Path, name: str) -> list:
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{storage}").get_trials()


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory):
    """The same Optuna command twice with n_trials=2 (the second has nothing left to do), then n_trials=3."""
    cwd = tmp_path_factory.mktemp("optuna")
    command = ["-m", *TINY, "logger=none", "hparams_search=optuna_lr", "hydra.sweeper.study_name=lr"]
    study_dir = cwd / "outputs" / "autoencoder" / "optuna" / "lr"
    steps = []
    for n_trials in (2, 2, 3):
        result = run_cli(*command, f"hydra.sweeper.n_trials={n_trials}", cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        steps.append((result, _study_trials(study_dir / "optuna.db", "lr")))
    return study_dir, steps


def test_optuna_sweep_stores_its_study_in_sqlite(optuna_sweep):
    study_dir, steps = optuna_sweep
    _, trials = steps[0]
    assert [t.number for t in trials] == [0, 1] and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        assert 1e-5 <= t.params["module.lr"] <= 1e-2  # the preset's log-uniform interval
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir == study_dir / str(t.number)
        lr = float(OmegaConf.load(run_dir / "config.yaml").module.lr)
        assert lr == pytest.approx(t.params["module.lr"], rel=1e-12)  # the trial trained with what was sampled
        best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
        score = next(s["best_model_score"] for k, s in best["callbacks"].items() if k.startswith("ModelCheckpoint"))
        assert t.value == pytest.approx(float(score))


def test_rerunning_the_optuna_command_resumes_the_study(optuna_sweep):
    study_dir, steps = optuna_sweep
    (_, first), (again, second), (extended, third) = steps
    assert "2 of 2 trials finished; resuming" in again.stdout and "Run directory" not in again.stdout
    assert [(t.number, t.value) for t in second] == [(t.number, t.value) for t in first]
    assert [(t.number, t.value) for t in third][:2] == [(t.number, t.value) for t in first]
    assert third[2].number == 2 and third[2].state.name == "COMPLETE"
    assert "2 of 3 trials finished; resuming" in extended.stdout
    assert sorted(p.name for p in study_dir.iterdir() if p.is_dir()) == ["0", "1", "2"]
    summary = json.loads((study_dir / "summary.json").read_text())
    assert [t["number"] for t in summary["trials"]] == [0, 1, 2]
    assert summary["best"]["value"] == min(t.value for t in third)


def test_an_optuna_search_without_multirun_is_refused(monkeypatch):
    sweeper = "hydra_plugins.lightning_ldm_sweeper.optuna_sweeper.OptunaSweeper"
    hydra = {"mode": RunMode.RUN, "sweeper": {"_target_": sweeper}}
    monkeypatch.setattr(HydraConfig.instance(), "cfg", OmegaConf.create({"hydra": hydra}))
    with pytest.raises(ConfigError, match="add -m"):
        with exit_on_user_error():
            pytest.fail("the task ran")


def test_search_space_maps_hydra_sweep_syntax_to_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = parse_search_space(["module.lr=tag(log, interval(1e-5, 1e-3))", "module.ema_decay=choice(0.999, 0.9999)",
                                "data.batch_size=range(8, 33, 8)", "unet.depth=int(interval(1, 4))",
                                "autoencoder=kl-f4-small,vq-f4-small", "max_steps=10", "max_steps=20"])
    d = space.distributions
    assert d["module.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert d["module.ema_decay"] == CategoricalDistribution([0.999, 0.9999])
    assert d["data.batch_size"] == IntDistribution(8, 32, step=8)
    assert d["unet.depth"] == IntDistribution(1, 4)
    assert d["autoencoder"] == CategoricalDistribution(["kl-f4-small", "vq-f4-small"])
    assert space.fixed == ["max_steps=20"]  # not a sweep: every trial gets it; the later value wins
    overrides = space.overrides({"module.lr": 1.2345e-4, "autoencoder": "vq-f4-small", "data.batch_size": 16})
    assert overrides == ["max_steps=20", "module.lr=0.00012345", "autoencoder=vq-f4-small", "data.batch_size=16"]


@pytest.mark.parametrize("spec,fragment", [("module.lr=range(0.1, 0.5, 0.1)", "range() over floats"),
                                           ("module.lr=tag(log, interval(0, 1))", "module.lr:"),
                                           ("module.lr=interval(2, 1)", "module.lr:")])
def test_search_space_errors_name_the_key(spec, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_search_space([spec])


# --------------------------------------------------------------------------------- DDP in a local multirun

def test_local_multirun_with_ddp_is_refused_in_one_line(tmp_path):
    result = run_cli("-m", *TINY, "logger=none", "trainer.devices=2", "module.lr=1e-3,2e-3", cwd=tmp_path)
    assert_one_line_error(result, "trainer.devices=2", "local multirun", "hydra/launcher=slurm", "trainer.devices=1")
    assert not list(tmp_path.glob("outputs/autoencoder/multirun/*/0")), "a trial ran before the refusal"


def _job(devices=1, nodes=1, strategy="auto", accelerator="cpu",
         launcher="hydra._internal.core_plugins.basic_launcher.BasicLauncher"):
    return OmegaConf.create({"hydra": {"launcher": {"_target_": launcher}},
                             "trainer": {"devices": devices, "num_nodes": nodes, "strategy": strategy,
                                         "accelerator": accelerator}})


@pytest.mark.parametrize("job,refused", [
    (_job(devices=1), False), (_job(devices=2), True), (_job(devices="0,1", accelerator="gpu"), True),
    (_job(devices=[0, 1], accelerator="gpu"), True), (_job(devices=1, nodes=2), True),
    (_job(devices=2, strategy="ddp_spawn"), False),  # spawned ranks don't rerun the command line
    (_job(devices=4, nodes=2, launcher="hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
     False)])
def test_ddp_check_refuses_only_what_would_relaunch_the_sweep(job, refused):
    if refused:
        with pytest.raises(ConfigError, match="every DDP rank would run the whole sweep again"):
            check_multirun_devices(job)
    else:
        check_multirun_devices(job)


# ------------------------------------------------------------------------------------------------- SLURM

@pytest.fixture
def full_config(tmp_path):
    """Compose with the hydra node kept (launcher settings interpolate the trainer's)."""
    register_resolvers()

    def _compose(*overrides):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=[f"paths.output_root={tmp_path}",
                                                     f"paths.run_dir={tmp_path / 'run'}", *overrides],
                                return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    HydraConfig.instance().cfg = None


def test_slurm_launcher_asks_slurm_for_the_trainers_nodes_and_gpus(full_config, monkeypatch, tmp_path):
    import submitit
    from hydra.utils import instantiate

    cfg = full_config("stage=autoencoder", "hydra/launcher=slurm", "trainer=slurm", "trainer.num_nodes=2",
                      "trainer.devices=4", "hydra.launcher.partition=gpu")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    captured = {}

    def capture(executor, *args):  # stop where submitit would call sbatch
        captured["executor"] = executor
        raise KeyboardInterrupt

    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # "srun exists"
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(KeyboardInterrupt):
        launcher.launch([["module.lr=1e-3"]], initial_job_idx=0)
    sbatch = captured["executor"]._executor._make_submission_file_text(command="python", uid="test")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--signal=USR2@120",
                 "--partition=gpu", "--time=1440", "--job-name=autoencoder"):
        assert f"#SBATCH {line}\n" in sbatch, sbatch
    assert str(tmp_path / "autoencoder" / "multirun") in sbatch  # logs under the sweep directory


def test_slurm_trainer_composes_and_builds_a_requeueing_slurm_environment(full_config, monkeypatch, tmp_path):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from lightning_ldm.tasks.train import build_trainer
    from lightning_ldm.training.checkpoint_io import AtomicCheckpointIO

    # SIGUSR2: not Lightning's default, so that the environment found is ours, not one Lightning detected itself
    cfg = full_config("stage=autoencoder", "trainer=slurm", "trainer.accelerator=cpu", "trainer.precision=32-true",
                      "logger=none", "trainer.plugins.0.requeue_signal=SIGUSR2")
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    validate_config(job)
    with pytest.raises(InstantiationException) as outside:  # the CLI prints the cause in one line
        instantiate(job.trainer.plugins[0])
    assert isinstance(outside.value.__cause__, ConfigError) and "not inside a SLURM job" in str(outside.value)
    for key, value in {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
                       "SLURM_JOB_NAME": "autoencoder"}.items():
        monkeypatch.setenv(key, value)
    trainer = build_trainer(job, tmp_path / "run")  # the task's own: the yaml's plugins + atomic checkpoints
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and type(trainer.strategy).__name__ == "DDPOnCurrentStreamStrategy"
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR2
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
