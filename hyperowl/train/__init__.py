"""Training and fine-tuning: recipes (`TrainConfig`), data, policies, the loop (`train`)."""
