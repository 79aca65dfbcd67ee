// TODO(adamw)
