// TODO(classifier)
