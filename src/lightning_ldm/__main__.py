"""``python -m lightning_ldm stage=<stage> [overrides]``: compose the config, check it, run the stage's task."""

import hydra
from omegaconf import DictConfig

from lightning_ldm.cli import CONFIG_DIR, exit_on_user_error, run_reporting_errors
from lightning_ldm.config.validate import validate_config
from lightning_ldm.extras import check_config_extras


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _main(cfg: DictConfig):
    with exit_on_user_error():
        validate_config(cfg)
        check_config_extras(cfg)
        import torch  # here, not at the top: --help and config errors answer without loading it

        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)  # global: before anything is built
        return hydra.utils.get_method(cfg.task.run)(cfg)


def main() -> None:
    run_reporting_errors(_main)


if __name__ == "__main__":
    main()
