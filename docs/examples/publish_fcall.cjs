// Publish on a sockdrawer channel from Node.js (ioredis) with the history
// policy the sockdrawer nodes wrote into Redis: the message is kept for
// sockdrawer.v1 clients that resume, exactly as sockdrawer.Client keeps it.
//
//   node publish_fcall.cjs <channel> <message>
//
// Prints the message's offset (or, when the nodes keep no history, the number
// of nodes that got it).
const Redis = require("ioredis");
const { randomUUID } = require("crypto");

async function publish(redis, channel, message) {
  const id = randomUUID(); // the same id on every retry: a retry cannot publish twice
  for (let attempt = 0; ; attempt++) {
    try {
      // FCALL sockdrawer_publish 1 <channel> <payload> <id> <check>: check "1" on a retry
      return await redis.call("FCALL", "sockdrawer_publish", 1, channel, message, id, attempt ? "1" : "");
    } catch (error) {
      if (/function not found/i.test(String(error))) {
        // no sockdrawer node has written its policy yet: a plain message
        return redis.publish(`sock-drawer/${channel}`, message);
      }
      if (attempt >= 5) throw error;
      await new Promise((resolve) => setTimeout(resolve, 100 * 2 ** attempt));
    }
  }
}

async function main() {
  const [channel = "news", message = "hello from Node"] = process.argv.slice(2);
  const redis = new Redis(process.env.SOCKDRAWER_URL || "redis://localhost:6379/0");
  try {
    console.log(await publish(redis, channel, message));
  } finally {
    redis.disconnect();
  }
}

main().catch((error) => {
  console.error(String(error));
  process.exit(1);
});
