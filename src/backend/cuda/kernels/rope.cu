// TODO(rope)
