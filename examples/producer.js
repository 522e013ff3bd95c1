// A producer in another language: celery-node publishes a protocol-2 JSON message.
// Usage, from a shell set up as the README's "Sending a command" says
// (eval "$(python -m worker env)" exports the URLs and the queue):
//   node producer.js '<users.create kwargs as JSON>'
const celery = require("celery-node");

const broker = process.env.BROKER_URL;
if (!broker) {
  console.error('BROKER_URL is not set: run eval "$(python -m worker env)" first');
  process.exit(2);
}
const client = celery.createClient(broker, process.env.RESULT_BACKEND || broker,
                                   process.env.COMMANDS_QUEUE || "commands");
const kwargs = JSON.parse(process.argv[2]);

client
  .createTask("users.create")
  .applyAsync([], kwargs)
  .get(30000)
  .then((result) => {
    console.log(JSON.stringify(result));
    client.disconnect();
  })
  .catch((error) => {
    console.error(String(error));
    client.disconnect();
    process.exit(1);
  });
