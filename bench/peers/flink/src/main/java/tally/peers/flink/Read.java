package tally.peers.flink;

import java.io.IOException;

import org.apache.flink.api.common.serialization.AbstractDeserializationSchema;
import org.msgpack.core.MessagePack;
import org.msgpack.core.MessageUnpacker;
import org.msgpack.value.ValueType;

/** One reading event of the quick start: a msgpack map {user, article, readtime, ts}. */
public final class Read {
    public long user;
    public long article;
    public double readtime;
    public long ts;

    public Read() {
    }

    /** The event in {@code payload}, or null (Flink then skips it) when it is not a
     * map with the four fields of their types -- the payloads Tally rejects. */
    static Read decode(byte[] payload) throws IOException {
        try (MessageUnpacker unpacker = MessagePack.newDefaultUnpacker(payload)) {
            if (!unpacker.hasNext() || unpacker.getNextFormat().getValueType() != ValueType.MAP) {
                return null;
            }
            Read read = new Read();
            int seen = 0;
            for (int fields = unpacker.unpackMapHeader(); fields > 0; fields--) {
                String key = unpacker.unpackString();
                ValueType type = unpacker.getNextFormat().getValueType();
                switch (key) {
                    case "user" -> read.user = type == ValueType.INTEGER ? unpacker.unpackLong() : skip(unpacker);
                    case "article" -> read.article = type == ValueType.INTEGER ? unpacker.unpackLong() : skip(unpacker);
                    case "ts" -> read.ts = type == ValueType.INTEGER ? unpacker.unpackLong() : skip(unpacker);
                    case "readtime" -> read.readtime = type == ValueType.FLOAT ? unpacker.unpackDouble()
                            : type == ValueType.INTEGER ? unpacker.unpackLong() : skip(unpacker);
                    default -> {
                        unpacker.skipValue();
                        continue;
                    }
                }
                seen += type == ValueType.INTEGER || type == ValueType.FLOAT ? 1 : 0;
            }
            return seen == 4 ? read : null;
        } catch (org.msgpack.core.MessagePackException e) {
            return null;
        }
    }

    private static long skip(MessageUnpacker unpacker) throws IOException {
        unpacker.skipValue();
        return 0;
    }
}

/** Pulsar payload -> Read. */
final class ReadSchema extends AbstractDeserializationSchema<Read> {
    @Override
    public Read deserialize(byte[] payload) throws IOException {
        return Read.decode(payload);
    }
}
