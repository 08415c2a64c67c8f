"""Evaluation grids reach every logger people use: TensorBoard, W&B (offline) and MLflow (file store), each through
its own image call, and a logger that cannot take images is named at start-up."""

import pytest
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

import cli
from conftest import demo_args, tensorboard


@pytest.mark.slow  # three loggers' fits
def test_evaluation_grid_and_captions_reach_tensorboard_wandb_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps its file store only on request
    run = cli.main(demo_args(tmp_path, "--trainer.max_steps", "2", "--trainer.val_check_interval", "1000",
                             "--model.eval_at_start", "true"), run=False)
    run.trainer.loggers = [
        TensorBoardLogger(tmp_path / "tb", name="run"),
        WandbLogger(save_dir=str(tmp_path), offline=True, project="precise-lightning-test"),
        MLFlowLogger(experiment_name="grids", tracking_uri=f"file:{tmp_path / 'mlruns'}"),
        CSVLogger(tmp_path / "csv"),
    ]
    with pytest.warns(UserWarning, match="ImageGridLogger: CSVLogger cannot take images"):
        run.trainer.fit(run.model, datamodule=run.datamodule)  # one evaluation: the starting weights
    prompt = "a scanned handwritten"  # the evaluation prompts' wording, in every caption
    run.trainer.loggers[1].experiment.finish()

    board = tensorboard(next((tmp_path / "tb" / "run").glob("version_*")))
    assert board.Tags()["images"] == ["eval/samples"] and "eval/prompts/text_summary" in board.Tags()["tensors"]

    (wandb_run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list((wandb_run / "files" / "media" / "images").rglob("samples_*.png"))
    assert prompt.encode() in next(wandb_run.glob("*.wandb")).read_bytes()  # the caption, in the run's history

    artifacts = next((tmp_path / "mlruns").rglob("artifacts"))
    assert list((artifacts / "images").glob("eval~samples+step+0+*.png"))
    (captions,) = (artifacts / "eval").glob("prompts_step_*.txt")
    assert prompt in captions.read_text()
