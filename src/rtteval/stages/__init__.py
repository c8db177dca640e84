"""The stages that make and change models: pretraining, fine-tune-first and unlearning."""
