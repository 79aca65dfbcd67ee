// TODO(embedding)
