"""The stages that make and change models: pretraining (and fine-tune-first) and unlearning."""
