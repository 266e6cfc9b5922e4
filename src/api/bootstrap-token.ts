// Bootstrap tokens, in upstream's format:
// orchard-bootstrap-token-v0.<base64url(name)>.<base64url(token)>[.<base64url(PEM certificate)>]
const PREFIX = 'orchard-bootstrap-token-v0';

export interface BootstrapToken {
  serviceAccountName: string;
  serviceAccountToken: string;
  certificate?: string;
}

const b64 = (s: string) => Buffer.from(s, 'utf8').toString('base64url');
const unb64 = (s: string) => Buffer.from(s, 'base64url').toString('utf8');

export function encodeBootstrapToken(t: BootstrapToken): string {
  const parts = [PREFIX, b64(t.serviceAccountName), b64(t.serviceAccountToken)];
  if (t.certificate) parts.push(b64(t.certificate));
  return parts.join('.');
}

export function decodeBootstrapToken(s: string): BootstrapToken {
  const parts = s.trim().split('.');
  if (parts[0] !== PREFIX || parts.length < 3 || parts.length > 4) {
    throw new Error(`not a bootstrap token: expected "${PREFIX}.<name>.<token>[.<certificate>]"`);
  }
  const token: BootstrapToken = { serviceAccountName: unb64(parts[1]), serviceAccountToken: unb64(parts[2]) };
  if (!token.serviceAccountName || !token.serviceAccountToken) throw new Error('bootstrap token has an empty name or token');
  if (parts[3]) {
    token.certificate = unb64(parts[3]);
    if (!token.certificate.includes('-----BEGIN CERTIFICATE-----')) throw new Error('bootstrap token carries something that is not a PEM certificate');
  }
  return token;
}
