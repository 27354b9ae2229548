// Usage: node stream_completion.js <host:port> <proto file> <prompt> <max_tokens>
// Prints one JSON line per GenerateResponse, then {"status": "OK"} (or the error) and exits.
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, protoFile, prompt, maxTokens] = process.argv.slice(2);
const definition = protoLoader.loadSync(protoFile, {
  keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
});
const longcat = grpc.loadPackageDefinition(definition).longcat.v1;
const client = new longcat.LongCat(address, grpc.credentials.createInsecure());

const call = client.Generate({
  text: prompt,
  sampling: { max_tokens: Number(maxTokens), temperature: 0, ignore_eos: true },
}, { deadline: Date.now() + 60000 });
call.on("data", (response) => console.log(JSON.stringify(response)));
call.on("error", (err) => {
  console.log(JSON.stringify({ status: grpc.status[err.code], details: err.details }));
  process.exit(1);
});
call.on("end", () => {
  console.log(JSON.stringify({ status: "OK" }));
  client.close();
});
