// A Docker token service for tests (the protocol of Docker Hub's auth.docker.io, ghcr.io and quay):
// `GET /token?service=…&scope=repository:NAME:ACTIONS` with optional Basic credentials answers a
// JWT that the CNCF distribution registry (`auth: token:`) accepts. Tokens are ES256, their header
// carries the signing certificate (`x5c`), which the registry checks against its `rootcertbundle`
// (the same self-signed certificate). Access is granted per repository to anonymous callers and to
// users; every request is recorded, for tests that count them or check what credentials reached it.
import { randomUUID, webcrypto } from 'node:crypto';
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';

export interface TokenRequest {
  /** the Authorization header as it arrived (a test checks it is there only when it should be) */
  authorization?: string;
  /** the user, when the credentials were right */
  user?: string;
  service: string | null;
  scopes: string[];
  /** `repository:NAME:ACTIONS` of what the token grants */
  granted: string[];
  status: number;
}

export interface TokenServerOptions {
  /** answers the registry's `service` parameter and is the tokens' audience */
  service: string;
  issuer?: string;
  /** user → password */
  users?: Record<string, string>;
  /** repository → the actions anyone gets, anonymous or not */
  anonymous?: Record<string, string[]>;
  /** user → repository → actions */
  grants?: Record<string, Record<string, string[]>>;
  /** serve over HTTPS with this certificate (else plain HTTP) */
  tls?: { cert: string; key: string };
}

export interface TokenServer {
  /** the realm to give the registry: `http(s)://127.0.0.1:PORT/token` */
  realm: string;
  service: string;
  issuer: string;
  /** PEM of the certificate whose key signs the tokens: the registry's `rootcertbundle` */
  certificate: string;
  requests: TokenRequest[];
  /** seconds the registry accepts a token for (its 60 s leeway included); default 300 */
  acceptedFor: number;
  /** every token issued so far, to check none of them reaches a log */
  issued: string[];
  stop(): Promise<void>;
}

const b64url = (b: Buffer | string) => Buffer.from(b).toString('base64url');

/** The registry accepts a token until exp + 60 s (distribution's clock-skew leeway). */
const REGISTRY_LEEWAY_S = 60;

export async function startTokenServer(opts: TokenServerOptions): Promise<TokenServer> {
  const x509 = await import('@peculiar/x509');
  x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);
  const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
  const keys = (await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '0a', name: 'CN=Orchard Test Token Signer', notBefore: new Date(now - 60_000), notAfter: new Date(now + 24 * 3600_000),
    signingAlgorithm: alg, keys,
    extensions: [new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true)],
  });
  const x5c = [Buffer.from(cert.rawData).toString('base64')];
  const issuer = opts.issuer ?? 'orchard-test-token-issuer';
  const requests: TokenRequest[] = [];
  const issued: string[] = [];

  const sign = async (claims: object): Promise<string> => {
    const head = b64url(JSON.stringify({ typ: 'JWT', alg: 'ES256', x5c }));
    const body = b64url(JSON.stringify(claims));
    // WebCrypto's ECDSA signature is r‖s, which is what JWS (and distribution's libtrust) expects.
    const sig = await webcrypto.subtle.sign({ name: 'ECDSA', hash: 'SHA-256' }, keys.privateKey, Buffer.from(`${head}.${body}`));
    return `${head}.${body}.${b64url(Buffer.from(sig))}`;
  };

  const server: TokenServer = { realm: '', service: opts.service, issuer, certificate: cert.toString('pem') + '\n', requests, acceptedFor: 300, issued, stop: async () => {} };

  const answer = async (req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url ?? '/', 'http://x');
    const record: TokenRequest = { authorization: req.headers.authorization, service: url.searchParams.get('service'), scopes: url.searchParams.getAll('scope'), granted: [], status: 200 };
    requests.push(record);
    const reply = (status: number, body: object) => {
      record.status = status;
      res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
    };
    if (url.pathname !== '/token') return reply(404, { details: 'not found' });
    if (record.service !== opts.service) return reply(400, { details: `unknown service ${record.service}` });
    let user: string | undefined;
    const auth = req.headers.authorization;
    if (auth) {
      const m = /^Basic (\S+)$/.exec(auth);
      const [name, ...rest] = m ? Buffer.from(m[1], 'base64').toString('utf8').split(':') : [];
      if (!m || name === undefined || opts.users?.[name] === undefined || opts.users[name] !== rest.join(':')) {
        res.setHeader('www-authenticate', 'Basic realm="orchard-test-token"');
        return reply(401, { details: 'incorrect username or password' });
      }
      user = name;
      record.user = user;
    }
    const access: { type: string; name: string; actions: string[] }[] = [];
    for (const scope of record.scopes) {
      const [type, name, actions] = scope.split(':');
      if (type !== 'repository' || !name || !actions) continue;
      const allowed = new Set([...(opts.anonymous?.[name] ?? []), ...(user ? (opts.grants?.[user]?.[name] ?? []) : [])]);
      // As Docker Hub does: a token with what may be granted (maybe nothing), never a refusal for the scope.
      const granted = actions.split(',').filter((a) => allowed.has(a));
      access.push({ type, name, actions: granted });
      if (granted.length) record.granted.push(`repository:${name}:${granted.join(',')}`);
    }
    const iat = Math.floor(Date.now() / 1000);
    const exp = iat + server.acceptedFor - REGISTRY_LEEWAY_S;
    const token = await sign({ iss: issuer, sub: user ?? '', aud: opts.service, exp, nbf: iat - 5, iat, jti: randomUUID(), access });
    issued.push(token);
    reply(200, { token, access_token: token, expires_in: server.acceptedFor, issued_at: new Date(iat * 1000).toISOString() });
  };
  const handler = (req: IncomingMessage, res: ServerResponse) => void answer(req, res).catch((err: Error) => res.writeHead(500).end(err.message));
  const http: Server = opts.tls ? createHttpsServer({ cert: opts.tls.cert, key: opts.tls.key }, handler) : createHttpServer(handler);
  await new Promise<void>((resolve) => http.listen(0, '127.0.0.1', resolve));
  const port = (http.address() as { port: number }).port;
  server.realm = `${opts.tls ? 'https' : 'http'}://127.0.0.1:${port}/token`;
  server.stop = () => new Promise<void>((resolve) => {
    http.closeAllConnections();
    http.close(() => resolve());
  });
  return server;
}
