"""Pure building blocks shared by every fedmq process: the network, data, codec, messages, errors."""
