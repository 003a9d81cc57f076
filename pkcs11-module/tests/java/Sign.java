// Java's SunPKCS11 provider (JDK, unmodified) on libkeysync_pkcs11.so:
// generates a P-256 and an RSA-2048 pair in the token (SunPKCS11 makes
// session objects), signs with each through the token, and verifies with
// the JDK's own providers.
//
// Usage: java Sign SUNPKCS11_CONFIG PIN
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.KeyStore;
import java.security.Provider;
import java.security.Security;
import java.security.Signature;
import java.security.spec.ECGenParameterSpec;

public class Sign {
    static boolean signAndVerify(Provider p, KeyPair kp, String alg, String verifier) throws Exception {
        byte[] data = "signed from Java".getBytes();
        Signature s = Signature.getInstance(alg, p);
        s.initSign(kp.getPrivate());
        s.update(data);
        byte[] sig = s.sign();
        Signature v = Signature.getInstance(alg, verifier);
        v.initVerify(kp.getPublic());
        v.update(data);
        return v.verify(sig);
    }

    public static void main(String[] args) throws Exception {
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, args[1].toCharArray());

        KeyPairGenerator ec = KeyPairGenerator.getInstance("EC", p);
        ec.initialize(new ECGenParameterSpec("secp256r1"));
        System.out.println("SHA256withECDSA verifies: "
            + signAndVerify(p, ec.generateKeyPair(), "SHA256withECDSA", "SunEC"));

        KeyPairGenerator rsa = KeyPairGenerator.getInstance("RSA", p);
        rsa.initialize(2048);
        System.out.println("SHA256withRSA verifies: "
            + signAndVerify(p, rsa.generateKeyPair(), "SHA256withRSA", "SunRsaSign"));
    }
}
