/**
 * The baseline of figure 1: a bare Fastify (the service's own version) serving one trivial JSON
 * route, no logger, no plugins, in its own process like the keystrata server. Started by run.ts
 * with PORT; prints `listening <port>` once it accepts connections.
 */
import Fastify from 'fastify';

const port = Number(process.env.PORT ?? 0);
const app = Fastify({ logger: false });
app.get('/hello', async () => ({ hello: 'world' }));

const shutdown = () => {
  void app.close().finally(() => process.exit(0));
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

await app.listen({ port, host: '127.0.0.1' });
const address = app.server.address();
console.log(`listening ${typeof address === 'object' && address !== null ? address.port : port}`);
