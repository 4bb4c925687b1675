//! One check of each kind: http, tcp, exec, grpc (filled by the health work).
