// TODO(attention)
