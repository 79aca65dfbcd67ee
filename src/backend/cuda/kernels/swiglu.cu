// TODO(swiglu)
