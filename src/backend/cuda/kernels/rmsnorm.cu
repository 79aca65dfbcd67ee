// TODO(rmsnorm)
