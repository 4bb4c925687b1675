//! sd_notify for services: the socket, its messages, and who may send them (filled by the notify work).
