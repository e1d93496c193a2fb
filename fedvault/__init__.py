"""fedvault: privacy-preserving federated learning on Flower with Opacus DP-SGD."""
