// Starts s3rver on 127.0.0.1:<port> with one bucket, its data under <directory>; prints "ready".
// Its only account is S3RVER / S3RVER; every signed request is checked (SigV4, headers and query).
const S3rver = require('@20minutes/s3rver');

const [port, directory, bucket] = process.argv.slice(2);
new S3rver({ port: Number(port), address: '127.0.0.1', silent: true, directory, configureBuckets: [{ name: bucket }] })
  .run()
  .then(() => console.log('ready'));
