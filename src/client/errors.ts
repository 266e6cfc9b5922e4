// The client's errors, in a module of their own: the CLI tells them apart without loading the client
// (HTTP, TLS, WebSocket) on every start.
export class ApiError extends Error {
  readonly status: number;
  constructor(status: number, message: string) {
    super(message);
    this.status = status;
  }
}

export class CertificateMismatchError extends Error {}
