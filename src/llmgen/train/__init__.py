"""The one training loop (pretrain and finetune) and its helpers."""
