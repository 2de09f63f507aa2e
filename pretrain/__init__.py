"""TerraFM pretraining (DINO with dual centering); never imported by terrafm."""
