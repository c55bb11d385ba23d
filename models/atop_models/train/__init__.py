"""`atop-train classifier | pretrain | finetune`: the offline trainer."""
