"""A plain LightningCLI script; the monitor comes from the YAML config (trainer.callbacks)."""

from lightning.pytorch.cli import LightningCLI

if __name__ == "__main__":
    LightningCLI(save_config_callback=None)
